"""Choose the final plan among the MILP candidates on held-out data longer than any profile.

Two checks, both on data the profile never saw:

- retrieval: greedy generation (RULER scoring) on held-out prompts at the validation length, counted
  on the prompts the dense model answers right itself (the ones there is something to keep);
- perplexity: per-window next-token NLL of plain text at ``ppl_length``, paired with the dense model
  on the same windows. A candidate whose ratio exceeds ``1 + ppl_tolerance`` is ruled out. This is the
  guard the retrieval prompts lack: at 1-2k tokens a head with a 64-token window costs no retrieval
  hit, while at 8k it costs next-token prediction everywhere.

Among admissible candidates the most hits win, ties go to the lower answer loss; when no candidate
is admissible the lowest perplexity ratio wins.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .plan import Plan


@torch.no_grad()
def answer_scores(model, plans, samples, tok=None, progress: bool = False) -> tuple[list[float], list[int]]:
    """(mean answer-token loss, retrieval hits) of each plan on held-out ``samples``; hits are counted
    only with ``tok`` and on samples the dense model answered right (``own``) that carry their prompt."""
    from .apply import apply_plan, remove_plan
    from .calibration import retrieves

    keep = [s for s in samples if tok is not None and s.own and s.source is not None]
    losses, hits = [], []
    for plan in tqdm(plans, desc="selection: held-out answers", disable=not progress):
        apply_plan(model, plan)
        try:
            total = 0.0
            for s in samples:  # each sample at its own length: the plan's reference length is the input's
                logits = model(s.ids[None]).logits[0, :-1]
                m = s.answer_mask[:-1]
                total += float(torch.nn.functional.cross_entropy(logits[m].float(), s.ids[1:][m]))
            losses.append(total / len(samples))
            hits.append(sum(retrieves(model, tok, s.source) for s in keep))
        finally:
            remove_plan(model)
    return losses, hits


@torch.no_grad()
def ppl_ratios(model, plans, stream: torch.Tensor, length: int, windows: int, progress: bool = False) -> list[dict]:
    """Each plan's perplexity over the dense model's on the same ``windows`` windows of ``length``
    tokens of ``stream`` (T,): ``stats.paired_ratio`` dicts {"windows", "ratio", "lo", "hi", "a_higher"}."""
    from ..metrics.perplexity import window_nlls
    from ..metrics.stats import paired_ratio
    from .apply import apply_plan, remove_plan

    remove_plan(model)
    dense = window_nlls(model, stream, length, windows)["nll"]
    out = []
    for plan in tqdm(plans, desc=f"selection: perplexity at {length}", disable=not progress):
        apply_plan(model, plan)
        try:
            out.append(paired_ratio(window_nlls(model, stream, length, windows)["nll"], dense))
        finally:
            remove_plan(model)
    return out


def choose(losses, hits, ratios=None, ppl_tolerance: float = 0.05) -> int:
    """Index of the chosen candidate (see the module docstring); ``ratios``: perplexity ratios or None."""
    n = len(losses)
    if ratios is None:
        return min(range(n), key=lambda i: (-hits[i], losses[i]))
    ok = [i for i in range(n) if ratios[i] <= 1 + ppl_tolerance]
    if not ok:
        return min(range(n), key=lambda i: ratios[i])
    return min(ok, key=lambda i: (-hits[i], losses[i]))


def select_by_validation(model, plans: list[Plan], samples, tok=None, ppl_stream=None, ppl_length: int = 0,
                         ppl_windows: int = 2, ppl_tolerance: float = 0.05,
                         progress: bool = False) -> tuple[Plan, dict]:  # fmt: skip
    """The chosen plan and {"losses", "hits", "ppl" (ratios or None)}, one entry per plan.

    ``samples``: held-out calibration samples (typically longer than any profile length);
    ``ppl_stream`` (T,) with ``ppl_length`` > 0: also rule out candidates whose perplexity at
    ``ppl_length`` is over ``1 + ppl_tolerance`` times dense (``ppl_windows`` paired windows)."""
    losses, hits = answer_scores(model, plans, samples, tok, progress)
    ratios = None
    if ppl_stream is not None and ppl_length:
        ratios = [r["ratio"] for r in ppl_ratios(model, plans, ppl_stream, ppl_length, ppl_windows, progress)]
    best = choose(losses, hits, ratios, ppl_tolerance)
    return plans[best], {"losses": losses, "hits": hits, "ppl": ratios}
