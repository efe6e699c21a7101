"""SmolLM2-135M checks (slow: they load the embedded model): prompt lengths with the real tokenizer,
the answer split at the space, and that generation scoring can tell a right answer from a wrong one."""

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    import mixattn
    from mixattn.train.data import load_corpus

    tok = mixattn.load_tokenizer("smollm2-135m")
    return mixattn.load("smollm2-135m"), tok, load_corpus("shakespeare", tokenizer=tok).val


@pytest.mark.parametrize("task", ["passkey", "multikey", "multivalue", "vartrack", "lines"])
def test_real_tokenizer_lengths_and_answer_split(smol, task):
    from mixattn.data import tasks

    _, tok, hay = smol
    for length in (1024, 4096, 8152):
        s = tasks.make(task, tok, hay, length, 0.5, tasks.prompt_seed(task, length, 0.5, 0))
        assert abs(s.length - length) <= 0.01 * length
        assert s.context_ids[: s.length] == s.prompt_ids  # the fast (prefix) path applies
        if task != "vartrack":  # digits split from the space; vartrack's names are " DSM"-style word tokens
            assert tok.decode(s.answer_ids).lstrip(" <") == tok.decode(s.answer_ids)  # no space or "<" scored


def test_dense_smollm2_retrieves_a_short_multikey_and_wrong_keys_score_lower(smol):
    from mixattn.data import tasks
    from mixattn.eval import retrieval

    model, tok, hay = smol
    s = tasks.make("multikey", tok, hay, 1024, 0.1, seed=tasks.prompt_seed("multikey", 1024, 0.1, 0))
    r = retrieval.score(model, tok, s)
    assert r["hit"], r["generated"]
    prompt = tok.decode(s.prompt_ids).rstrip(" ")  # the prompt text without the separating space
    wrong = tasks.make_sample(tok, prompt, [s.meta["distractors"][0]], " " + s.meta["distractors"][0], {})
    assert retrieval.score(model, tok, wrong)["logprob"] < r["logprob"] - 2


def test_generation_starts_after_the_separating_space_and_dense_retrieves_a_2k_passkey(smol):
    """SmolLM2 writes " 1234567" as a bare space token plus digits. Generation starts after that space
    (it is prompt, as in the log-probability's joint tokenization): before it, dense greedy decoding
    answers " a magical key ..." on most passkey prompts although p(digits | space) is about 0.8."""
    from mixattn.data import tasks
    from mixattn.eval import retrieval

    model, tok, hay = smol
    s = tasks.make("passkey", tok, hay, 2048, 0.5, seed=tasks.prompt_seed("passkey", 2048, 0.5, 0))
    assert tok.decode(s.prompt_ids[-1:]) == " " and s.prompt_ids == s.context_ids
    r = retrieval.score(model, tok, s)
    assert r["hit"] and r["generated"].startswith(s.answers[0]), r["generated"]
