"""Task generators: target lengths, distinct seeds and keys, needles present, answer split."""

import pytest

from mixattn.data import tasks

from .helpers import WordTok, byte_tok, haystack

RETRIEVAL = ("passkey", "multikey", "multivalue", "vartrack", "lines")


@pytest.mark.parametrize("make_tok", [byte_tok, WordTok], ids=["bytes", "words"])
@pytest.mark.parametrize("task", [*RETRIEVAL, "passage"])
def test_prompts_hit_their_target_length_within_one_percent(task, make_tok):
    tok = make_tok()
    hay = haystack(tok)
    for length in (1000, 3000):
        for depth in (0.0, 0.5, 1.0):
            s = tasks.make(task, tok, hay, length, depth, seed=tasks.prompt_seed(task, length, depth, 0))
            assert abs(s.length - length) <= 0.01 * length, (task, length, depth, s.length)


@pytest.mark.parametrize("task", RETRIEVAL)
def test_every_prompt_has_its_own_key_and_is_reproducible(task):
    tok = byte_tok()
    hay = haystack(tok)
    seeds = [tasks.prompt_seed(task, 2000, 0.5, i) for i in range(6)]
    assert len(set(seeds)) == 6
    samples = [tasks.make(task, tok, hay, 2000, 0.5, s) for s in seeds]
    assert len({s.answers for s in samples}) == 6
    assert len({tuple(s.prompt_ids) for s in samples}) == 6
    again = tasks.make(task, tok, hay, 2000, 0.5, seeds[0])
    assert again.prompt_ids == samples[0].prompt_ids and again.answers == samples[0].answers


@pytest.mark.parametrize("task", RETRIEVAL)
def test_every_answer_is_in_the_context_and_not_in_the_question(task):
    tok = byte_tok()
    s = tasks.make(task, tok, haystack(tok), 1500, 0.3, seed=7)
    text = tok.decode(s.prompt_ids)
    question_start = text.rfind("\n\n")
    for a in s.answers:
        assert a in text[:question_start], a
    if task != "vartrack":  # variable tracking states the value, and asks for the names
        assert not any(a in text[question_start:] for a in s.answers)


def test_multikey_has_distractors_that_differ_from_the_key():
    tok = byte_tok()
    s = tasks.make("multikey", tok, haystack(tok), 1500, 0.5, seed=3)
    text = tok.decode(s.prompt_ids)
    assert len(s.meta["distractors"]) == 3
    for d in s.meta["distractors"]:
        assert d != s.answers[0] and d in text


def test_needle_depth_moves_the_needle():
    tok = byte_tok()
    hay = haystack(tok)
    pos = []
    for depth in (0.1, 0.5, 0.9):
        s = tasks.make("passkey", tok, hay, 3000, depth, seed=11)
        pos.append(tok.decode(s.prompt_ids).find(s.answers[0]) / s.length)
    assert pos[0] < 0.25 < pos[1] < 0.65 < pos[2]


def test_answer_split_puts_whitespace_on_the_context_side():
    tok = byte_tok()  # one token per byte: the space can be separated
    s = tasks.make("passkey", tok, haystack(tok), 1000, 0.5, seed=1)
    assert tok.decode(s.answer_ids) == s.answers[0]
    assert tok.decode(s.context_ids).endswith("is ")
    assert s.context_ids[: s.length] == s.prompt_ids
    words = WordTok()  # " 1234567" is one token: the space cannot be split off, so it stays in the answer
    s = tasks.make_sample(words, "The pass key is", ["1234567"], " 1234567", {})
    assert words.decode(s.answer_ids) == " 1234567" and words.decode(s.context_ids) == "The pass key is"
    s = tasks.make_sample(words, "line x is <", ["1234567"], "1234567", {})  # glued to "<": the token holds both
    assert words.decode(s.answer_ids) == " <1234567" and words.decode(s.context_ids) == "line x is"


def test_bad_arguments_name_themselves():
    tok = byte_tok()
    hay = haystack(tok)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.make("nope", tok, hay, 1000, 0.5, 0)
    with pytest.raises(ValueError, match="length must be a positive"):
        tasks.make("passkey", tok, hay, 0, 0.5, 0)
    with pytest.raises(ValueError, match="depth must be in"):
        tasks.make("passkey", tok, hay, 1000, 1.5, 0)
    with pytest.raises(ValueError, match="haystack has"):
        tasks.make("passkey", tok, hay[:500], 1000, 0.5, 0)
