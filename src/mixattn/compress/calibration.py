"""Calibration data for plan search (MoA, arXiv 2406.14909 §4): long-range tasks over real text,
with the loss on answer tokens only.

Tasks cycle through passkey, multi-key NIAH with distractors, LongEval lines and "what follows this
distant passage", over Shakespeare/stdlib (or user) text, each prompt with its own seed and depth.
Answers: the model's own greedy answer (up to ``answer_tokens``, stopped at EOS) where it is right
(MoA found aligning to the model's own answers beats gold ones), and the gold answer where it is
wrong, so the profile never rewards attention that retrieves a distractor. Deterministic given a seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data import load_corpus, tasks
from ..data.tasks import is_hit

CALIB_TASKS = ("passkey", "multikey", "lines", "passage")
# Held-out selection counts greedy hits on the prompts dense answers itself: tasks SmolLM2-135M
# answers (of 32 calibration prompts at 1-2k: passkey 8/8, multikey 6/8, lines 0/8, passage 0/8).
VALIDATION_TASKS = ("passkey", "multikey")


@dataclass
class CalibSample:
    ids: torch.Tensor  # (T,) prompt + answer, T <= length
    answer_mask: torch.Tensor  # (T,) bool: True at positions whose next token is an answer token
    length: int  # the profile length it was built for
    task: str = ""
    own: bool = False  # True: the model's own (correct) answer; False: the gold answer
    source: tasks.Sample | None = None  # the task prompt and answers: validation scores it by generation


def to_plain(samples: list[CalibSample]) -> list[dict]:
    """Calibration samples as plain tensors, lists and strings, for the on-disk cache: no pickled
    classes, so a cache survives a refactor (a moved class) and loads with ``weights_only=True``."""
    out = []
    for s in samples:
        d = {"ids": s.ids, "answer_mask": s.answer_mask, "length": s.length, "task": s.task, "own": s.own}
        if s.source is not None:
            src = s.source
            d["source"] = {"prompt_ids": list(src.prompt_ids), "answers": list(src.answers),
                           "context_ids": list(src.context_ids), "answer_ids": list(src.answer_ids),
                           "meta": dict(src.meta)}  # fmt: skip
        out.append(d)
    return out


def from_plain(data: list[dict]) -> list[CalibSample]:
    """The inverse of ``to_plain``."""
    out = []
    for d in data:
        src = d.get("source")
        source = None if src is None else tasks.Sample(src["prompt_ids"], tuple(src["answers"]), src["context_ids"],
                                                       src["answer_ids"], src["meta"])  # fmt: skip
        out.append(CalibSample(d["ids"], d["answer_mask"], d["length"], d["task"], d["own"], source))
    return out


def gold(sample: tasks.Sample) -> tuple[torch.Tensor, int]:
    """Prompt + gold answer tokenized as one string, and the first answer position (ids (T,), start)."""
    joint = sample.context_ids + sample.answer_ids
    P = len(sample.prompt_ids)
    start = P if joint[:P] == sample.prompt_ids else tasks._common(joint, sample.prompt_ids)
    return torch.tensor(joint), start


def step_logits(model, token: int, cache, pos: int, N: int) -> torch.Tensor:
    """Logits (V,) after feeding one token at position ``pos``."""
    return model(torch.tensor([[token]]), cache, start_pos=pos, ref_len=N).logits[0, -1].float()


def greedy_steps(model, logits: torch.Tensor, cache, pos: int, N: int, max_new_tokens: int, stop_tokens=()):
    """Greedy tokens continuing from ``logits`` (V,), the prediction for position ``pos``, through
    ``cache`` (reference length ``N``), one at a time: up to ``max_new_tokens``, stopping before a
    stop token. A generator, so a caller may stop early (the cache then holds only what was fed)."""
    for i in range(max_new_tokens):
        nxt = int(logits.argmax())
        if nxt in stop_tokens:
            return
        yield nxt
        if i + 1 < max_new_tokens:
            logits = step_logits(model, nxt, cache, pos + i, N)


@torch.no_grad()
def greedy_answer(model, tok, prompt_ids, answer_tokens: int = 16) -> torch.Tensor:
    """(n,) the model's greedy continuation of ``prompt_ids``, n <= ``answer_tokens``, cut at EOS (the
    reference length a plan sees is prompt + ``answer_tokens``, as in evaluation)."""
    eos = getattr(tok, "eos_token_id", None)
    prompt = torch.tensor(prompt_ids)
    gen = model.generate(prompt[None], answer_tokens, stop_tokens=(eos,) if eos is not None else ())[0, len(prompt) :]
    if eos is not None:
        hit_eos = (gen == eos).nonzero()
        gen = gen[: int(hit_eos[0])] if len(hit_eos) else gen
    return gen


def retrieves(model, tok, sample: tasks.Sample, answer_tokens: int = 16) -> bool:
    """True iff the greedy answer contains every gold answer string (RULER's scoring)."""
    gen = greedy_answer(model, tok, sample.prompt_ids, answer_tokens)
    return bool(len(gen)) and is_hit(tok.decode(gen.tolist()), sample.answers)


@torch.no_grad()
def answer(model, tok, sample: tasks.Sample, answer_tokens: int) -> tuple[torch.Tensor, int, bool]:
    """(ids (T,), first answer position, own): the model's greedy answer if it contains every gold
    answer string, else the gold answer. Generation stops at EOS (the EOS itself is not kept)."""
    prompt = torch.tensor(sample.prompt_ids)
    gen = greedy_answer(model, tok, sample.prompt_ids, answer_tokens)
    if len(gen) and is_hit(tok.decode(gen.tolist()), sample.answers):
        return torch.cat([prompt, gen]), len(prompt), True
    ids, start = gold(sample)
    return ids, start, False


def build(model, tok, corpora, lengths, samples_per_length: int = 16, seed: int = 0, answer_tokens: int = 16,
          progress: bool = True, task_names=CALIB_TASKS) -> list[CalibSample]:  # fmt: skip
    """``samples_per_length`` samples at each length, cycling through ``task_names`` and depths."""
    if samples_per_length < 1:
        raise ValueError(f"samples_per_length must be >= 1, got {samples_per_length}")
    if not task_names or any(t not in tasks.TASKS for t in task_names):
        raise ValueError(f"task_names must name tasks of {', '.join(tasks.TASKS)}, got {task_names!r}")
    hay = load_corpus(corpora, tokenizer=tok)
    haystack = hay.train  # evaluation draws its haystacks from the validation split: keep them apart
    out = []
    jobs = [(N, i) for N in lengths for i in range(samples_per_length)]
    for N, i in tqdm(jobs, desc="calibration (answers: own if right, else gold)", disable=not progress):
        task = task_names[i % len(task_names)]
        depth = ((i * 7) % samples_per_length + 0.5) / samples_per_length  # spread depths across tasks
        s = tasks.make(task, tok, haystack, N - answer_tokens - 8, depth, tasks.prompt_seed(task, N, depth, i, seed))
        ids, start, own = answer(model, tok, s, answer_tokens)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[start - 1 : len(ids) - 1] = True  # logits at these positions predict the answer
        out.append(CalibSample(ids, mask, N, task, own, s))
    if not out:
        raise ValueError("calibration produced no samples (check lengths and corpora)")
    return out


def summary(samples: list[CalibSample]) -> dict:
    """{"per_length": {N: n}, "own_answers": k, "gold_answers": n - k, "tasks": {task: n}}."""
    per, by_task = {}, {}
    for s in samples:
        per[s.length] = per.get(s.length, 0) + 1
        by_task[s.task] = by_task.get(s.task, 0) + 1
    own = sum(s.own for s in samples)
    return {"per_length": per, "own_answers": own, "gold_answers": len(samples) - own, "tasks": by_task}
