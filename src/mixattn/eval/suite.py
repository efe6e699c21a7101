"""``mixattn eval``: several plans side by side on one model, on the same prompts.

Retrieval: every (task, length, depth, index) prompt has its own seed (``tasks.prompt_seed``); each
method is scored on exactly those prompts by greedy generation (``retrieval.score``), so methods can
be compared pairwise. Every record carries the plan's measured KV density at its reference length.
Perplexity: several held-out windows at each length. Speed: prefill time and decode tokens/s
(median of repeats) and KV bytes. Results are a JSON-able dict; ``report.write`` renders them.

A plan in ``plans`` is ``None`` (dense), a ``Plan``, or ``{length: Plan}`` for baselines fitted to a
reference density at each eval length.
"""

from __future__ import annotations

import statistics
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from ..compress.apply import apply_plan, remove_plan
from ..data import tasks
from ..metrics.perplexity import window_nlls
from . import retrieval, speed
from .journal import plan_digest, recall

RETRIEVAL = tuple(t for t in tasks.TASKS if t != "passage")
OTHER = ("ppl", "speed")


def plan_at(plan, length: int):
    """The plan used at eval ``length``: ``plan`` itself, or its entry for that length."""
    if isinstance(plan, dict):
        if length not in plan:
            raise ValueError(f"no plan fitted for length {length} (have {sorted(plan)})")
        return plan[length]
    return plan


def density(plan, N: int) -> float:
    """Mean KV density of ``plan`` (None = dense) at reference length N."""
    return 1.0 if plan is None else float(plan.density([N]))


def check_args(model, task_names, lengths, depths, samples: int) -> None:
    valid = (*tasks.TASKS, *OTHER)
    unknown = [t for t in task_names if t not in valid]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; valid: {', '.join(valid)}")
    if not lengths or any(int(N) <= 0 for N in lengths):
        raise ValueError(f"lengths must be positive, got {list(lengths)}")
    longest = max(lengths)
    if longest > model.cfg.max_seq_len:
        raise ValueError(f"length {longest} exceeds the model's max_seq_len {model.cfg.max_seq_len}")
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be in [0, 1], got {list(depths)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")


def prompt_length(model, task: str, length: int) -> int:
    """Prompt tokens for eval length L: L, or less where L + the answer budget would pass max_seq_len."""
    return min(length, model.cfg.max_seq_len - tasks.MAX_NEW_TOKENS[task])


def build_prompts(model, tok, task_names, lengths, depths, samples: int, haystack_corpus="shakespeare",
                  seed: int = 0, progress: bool = True) -> dict:  # fmt: skip
    """{(task, length, depth, index): Sample}; each prompt with its own seed."""
    from ..data import load_corpus

    hay = load_corpus(haystack_corpus, tokenizer=tok).val
    items = [(t, N, d, i) for t in task_names if t in tasks.TASKS for N in lengths for d in depths for i in range(samples)]
    built = {}
    for t, N, d, i in tqdm(items, desc="building prompts", disable=not progress):
        s = tasks.make(t, tok, hay, prompt_length(model, t, N), d, tasks.prompt_seed(t, N, d, i, seed))
        built[(t, N, d, i)] = s
    return built


def evaluate(model, tok, plans: dict, task_names, lengths, depths, samples: int = 1, haystack_corpus="shakespeare",
             ppl_corpus="shakespeare", ppl_windows: int = 2, ppl_lengths=None, speed_context: int = 4096,
             speed_repeats: int = 3, seed: int = 0, out_dir=None, progress: bool = True, prompts=None,
             journal=None, so_far: bool = False) -> dict:  # fmt: skip
    """``plans``: label -> None | Plan | {length: Plan}. Returns
    {"retrieval": [record...], "density": {label: {L: d}}, "ppl": {label: {L: {...}}}, "speed": {label: {...}}}.

    A retrieval record: method, task, length, depth, index, seed, prompt_len, ref_len, density, hit,
    generated, logprob, answer_tokens. ``journal`` (``journal.Journal``): retrieval scores and
    perplexities already in it are read from it, new ones are added as they finish (resumable runs).
    ``so_far``: compute nothing; the results are what ``journal`` holds (a look at a run in progress:
    cells have the n finished so far, and speed is left out).
    """
    if so_far and journal is None:
        raise ValueError("so_far reads a journal; none was given")
    check_args(model, task_names, lengths, depths, samples)
    if prompts is None:
        prompts = build_prompts(model, tok, task_names, lengths, depths, samples, haystack_corpus, seed, progress)
    results: dict = {"retrieval": [], "density": {}, "ppl": {}, "speed": {}}
    ppl_lengths = list(ppl_lengths or lengths)
    for label, plan in plans.items():
        results["density"][label] = {}
        for N in lengths:  # the plan's density at the eval length (+ a 16-token answer budget)
            results["density"][label][N] = density(plan_at(plan, N), N + 16)
        for N in lengths:
            _apply(model, plan_at(plan, N))
            todo = [(k, s) for k, s in prompts.items() if k[1] == N]
            digest = plan_digest(plan_at(plan, N))
            for (t, _, d, i), s in tqdm(todo, desc=f"{label} @{N}", disable=not progress):
                key = ["retrieval", digest, t, N, d, i, s.meta["seed"], haystack_corpus]
                r = recall(journal, key, None if so_far else partial(retrieval.score, model, tok, s, tasks.MAX_NEW_TOKENS[t]))
                if r is None:  # so_far: not scored yet
                    continue
                results["retrieval"].append({
                    "method": label, "task": t, "length": N, "depth": d, "index": i, "seed": s.meta["seed"],
                    "prompt_len": s.length, "density": density(plan_at(plan, N), r["ref_len"]), **r,
                })  # fmt: skip
        if "ppl" in task_names:
            from ..data import corpus_tokens

            stream = corpus_tokens(ppl_corpus, tok, max(ppl_lengths) * ppl_windows + 1)
            results["ppl"][label] = {}
            for N in ppl_lengths:
                key = ["ppl", plan_digest(plan_at(plan, N)), N, ppl_windows, ppl_corpus]
                got = recall(journal, key, None if so_far else partial(_ppl, model, plan_at(plan, N), stream, N, ppl_windows))
                if got is not None:
                    results["ppl"][label][N] = got
        if "speed" in task_names and not so_far:
            _apply(model, plan_at(plan, max(lengths)))  # the plan fitted nearest the speed context
            runs = [speed.measure(model, speed_context, warmup=256 if r == 0 else 0) for r in range(speed_repeats)]
            results["speed"][label] = {
                "prefill_s": statistics.median(x["prefill_s"] for x in runs),
                "decode_tok_s": statistics.median(x["decode_tok_s"] for x in runs),
                "kv_bytes": runs[0]["kv_bytes"], "repeats": speed_repeats, "context": speed_context,
                "prefill_all": [x["prefill_s"] for x in runs], "decode_all": [x["decode_tok_s"] for x in runs],
            }  # fmt: skip
    remove_plan(model)
    if out_dir is not None:
        from .report import write

        write(results, Path(out_dir))
    return results


def _ppl(model, plan, stream, N: int, windows: int) -> dict:
    _apply(model, plan)
    return window_nlls(model, stream, N, windows)


def _apply(model, plan) -> None:
    remove_plan(model)
    if plan is not None:
        apply_plan(model, plan)
