"""Calibration against values written here: which answer is kept (own vs gold, EOS, the answer
budget), the gold answer's first position when the tokenizer merges the prompt's end with the answer,
the lengths, depths and seeds of built samples, and the summary."""

import pytest
import torch

from mixattn.compress import calibration as cal
from mixattn.data import tasks

from ..data.helpers import WordTok, byte_tok, haystack


class Says:
    """A model whose greedy continuation is ``text`` (then EOS); records the token budget it was given."""

    def __init__(self, tok, text, eos=None):
        self.ids, self.asked = tok.encode(text) + ([eos] if eos is not None else []), []

    def generate(self, ids, n, stop_tokens=()):
        self.asked.append(n)
        return torch.cat([ids, torch.tensor([self.ids[:n]])], 1)


class EosTok(WordTok):
    eos_token_id = 0


def test_the_answer_budget_and_eos_decide_what_is_the_models_own_answer():
    tok = byte_tok()
    s = tasks.make("passkey", tok, haystack(tok), 1000, 0.5, seed=3)
    m = Says(tok, " " + s.answers[0] + ".")
    ids, start, own = cal.answer(m, tok, s, 5)  # 5 tokens: " " + 4 digits, not the whole key
    assert m.asked == [5] and not own and ids.tolist() == s.context_ids + s.answer_ids
    assert cal.retrieves(Says(tok, " " + s.answers[0]), tok, s) and not cal.retrieves(Says(tok, ""), tok, s)
    words = EosTok()
    w = tasks.make("passkey", words, haystack(words), 1500, 0.5, seed=3)
    said = Says(words, " no.", eos=0)
    said.ids += words.encode(" " + w.answers[0])  # the key only after EOS: not an answer
    assert not cal.retrieves(said, words, w)
    assert cal.answer(said, words, w, 16)[2] is False
    ids, start, own = cal.answer(Says(words, " " + w.answers[0], eos=0), words, w, 16)
    assert own and ids.tolist() == w.prompt_ids + words.encode(" " + w.answers[0])  # cut at EOS, EOS dropped


def test_gold_answer_starts_where_the_joint_tokens_leave_the_prompt():
    words = WordTok()
    s = tasks.make("lines", words, haystack(words), 1500, 0.5, seed=6)  # "<" glued to the value
    ids, start = cal.gold(s)
    joint = s.context_ids + s.answer_ids
    first_diff = next(i for i, (a, b) in enumerate(zip(joint, s.prompt_ids)) if a != b)
    assert start == first_diff < len(s.prompt_ids) and ids.tolist() == joint
    tok = byte_tok()
    p = tasks.make("passkey", tok, haystack(tok), 1000, 0.5, seed=1)
    assert cal.gold(p)[1] == len(p.prompt_ids)  # the prompt is a prefix: the answer starts after it


def test_build_lengths_depths_seeds_and_summary(tmp_path):
    tok = byte_tok()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(bytes(haystack(tok, 30000).astype("uint8")).decode("latin-1"))

    class Wrong:
        def generate(self, ids, n, stop_tokens=()):
            return torch.cat([ids, torch.full((1, n), ord("~"))], 1)

    N, n = 1100, 4
    samples = cal.build(Wrong(), tok, [str(tmp_path / "c")], (N,), samples_per_length=n, seed=5, progress=False)
    depths = [0.125, 0.875, 0.625, 0.375]  # ((7 i) mod 4 + 0.5) / 4
    for i, s in enumerate(samples):
        meta = s.source.meta
        assert meta["depth"] == depths[i] and s.task == cal.CALIB_TASKS[i] and s.length == N
        assert meta["seed"] == tasks.prompt_seed(s.task, N, depths[i], i, 5)
        assert abs(meta["length"] - (N - 16 - 8)) <= 0.01 * N  # room for 16 answer tokens and 8 more
    assert cal.summary(samples) == {"per_length": {N: 4}, "own_answers": 0, "gold_answers": 4,
                                    "tasks": {t: 1 for t in cal.CALIB_TASKS}}  # fmt: skip
    chosen = cal.build(Wrong(), tok, [str(tmp_path / "c")], (N,), 3, seed=5, progress=False, task_names=("multikey",))
    assert [s.task for s in chosen] == ["multikey"] * 3
    for bad in ((), ("passkey", "haiku")):
        with pytest.raises(ValueError, match="task_names must name tasks of passkey"):
            cal.build(Wrong(), tok, [str(tmp_path / "c")], (N,), 1, task_names=bad)
