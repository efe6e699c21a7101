"""Generation scoring: it must be able to fail, stop at EOS, and score content tokens only."""

import math

import pytest

from mixattn.data import tasks
from mixattn.eval import retrieval

from ..data.helpers import ScriptedLM, WordTok, byte_tok, haystack


def _scripted(tok, sample, said: str, vocab=256):
    """A model whose greedy continuation of ``sample``'s prompt is ``said``."""
    return ScriptedLM(sample.prompt_ids + tok.encode(said), vocab)


def test_is_hit_needs_every_answer():
    assert retrieval.is_hit(" 1234567.", ["1234567"])
    assert not retrieval.is_hit(" 123456.", ["1234567"])
    assert not retrieval.is_hit(" 1111111, 2222222", ["1111111", "2222222", "3333333"])
    with pytest.raises(ValueError, match="answers"):
        retrieval.is_hit("x", [])


def test_scorer_misses_a_wrong_answer_and_hits_the_right_one():
    tok = byte_tok()
    s = tasks.make("passkey", tok, haystack(tok), 1000, 0.5, seed=2)
    key = s.answers[0]
    wrong = str(int(key) + 1)
    assert not retrieval.score(_scripted(tok, s, " " + wrong + "."), tok, s)["hit"]
    assert not retrieval.score(_scripted(tok, s, " the key."), tok, s)["hit"]
    r = retrieval.score(_scripted(tok, s, " " + key + ". Remember it."), tok, s)
    assert r["hit"] and r["generated"].startswith(" " + key)
    assert len(r["generated"]) == 16  # up to max_new_tokens


def test_generation_stops_at_eos():
    tok = WordTok()
    hay = haystack(tok)
    s = tasks.make("passkey", tok, hay, 1500, 0.5, seed=4)
    vocab = len(tok.inv) + 64
    key = s.answers[0]
    said = tok.encode(" no.") + [tok.eos_token_id] + tok.encode(" " + key)  # the key only after EOS
    r = retrieval.score(ScriptedLM(s.prompt_ids + said, vocab), tok, s)
    assert r["generated"] == " no." and not r["hit"]


def test_logprob_scores_content_tokens_and_separates_right_from_wrong():
    tok = byte_tok()
    s = tasks.make("multikey", tok, haystack(tok), 1000, 0.5, seed=5)
    key = s.answers[0]
    right = retrieval.score(ScriptedLM(s.context_ids + s.answer_ids, 256), tok, s)
    assert right["answer_tokens"] == len(key) and right["logprob"] > -1e-6
    # a model that puts everything on the space and then a wrong key: content tokens are all wrong
    wrong = retrieval.score(ScriptedLM(s.context_ids + tok.encode(key[::-1]), 256), tok, s)
    assert wrong["logprob"] < -20 * sum(a != b for a, b in zip(key, key[::-1])) + 1


def test_logprob_when_the_tokenizer_glues_the_space_to_the_answer():
    tok = WordTok()
    s = tasks.make("passkey", tok, haystack(tok), 1500, 0.5, seed=6)
    vocab = len(tok.inv) + 8
    r = retrieval.score(ScriptedLM(s.context_ids + s.answer_ids, vocab), tok, s)
    assert r["answer_tokens"] == 1 and math.isclose(r["logprob"], 0.0, abs_tol=1e-6) and r["hit"]
    s2 = tasks.make("lines", tok, haystack(tok), 1500, 0.5, seed=6)  # "<" glued to the value: slow path
    assert s2.context_ids != s2.prompt_ids[: len(s2.context_ids)] or len(s2.context_ids) < len(s2.prompt_ids)
    r2 = retrieval.score(ScriptedLM(s2.context_ids + s2.answer_ids, len(tok.inv) + 8), tok, s2)
    assert math.isclose(r2["logprob"], 0.0, abs_tol=1e-6)


def test_max_new_tokens_is_validated():
    tok = byte_tok()
    s = tasks.make("passkey", tok, haystack(tok), 1000, 0.5, seed=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        retrieval.score(ScriptedLM(s.prompt_ids, 256), tok, s, max_new_tokens=0)
