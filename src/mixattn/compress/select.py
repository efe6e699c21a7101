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

import copy

import torch
from tqdm.auto import tqdm

from .plan import Plan


@torch.no_grad()
def loss_and_hit(model, tok, s, answer_tokens: int = 16) -> tuple[float, bool | None]:
    """(mean answer-token loss, greedy hit or None) of one calibration sample from a single prefill of
    its prompt: the answer is teacher-forced through a copy of the cache, and the greedy answer (up to
    ``answer_tokens``, cut at EOS) continues from the cache itself. The hit is scored (RULER's rule)
    only with ``tok``, on samples the dense model answered right (``own``) that carry their prompt;
    the reference length is prompt + ``answer_tokens``, as in evaluation."""
    from ..data.tasks import is_hit
    from .calibration import greedy_steps, retrieves, step_logits

    ids, m = s.ids.tolist(), s.answer_mask
    if not bool(m[:-1].any()):
        raise ValueError(f"a held-out {s.task or 'calibration'} sample has no answer position to score")
    T, P = len(ids), int(m.nonzero()[0]) + 1  # logits at P - 1 predict the first answer token
    N = max(P + answer_tokens, T)
    cache = model.new_cache(N)
    first = model(s.ids[None, :P], cache, ref_len=N, logits_to_keep=1).logits[0, -1].float()
    tf, logits, nll, count = copy.deepcopy(cache), first, 0.0, 0
    for i in range(P - 1, T - 1):
        if i >= P:
            logits = step_logits(model, ids[i], tf, i, N)
        if m[i]:
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[i + 1])))
            count += 1
    del tf
    if tok is None or not s.own or s.source is None:
        return nll / count, None
    if list(s.source.prompt_ids) != ids[:P]:  # the answer merged into the prompt's last token: generate anew
        return nll / count, retrieves(model, tok, s.source, answer_tokens)
    eos = getattr(tok, "eos_token_id", None)
    out = []
    for nxt in greedy_steps(model, first, cache, P, N, answer_tokens, () if eos is None else (eos,)):
        out.append(nxt)
        if is_hit(tok.decode(out), s.source.answers):  # a hit cannot be undone by later tokens
            return nll / count, True
    return nll / count, False


@torch.no_grad()
def answer_scores(model, plans, samples, tok=None, progress: bool = False) -> tuple[list[float], list[int]]:
    """(mean answer-token loss, retrieval hits) of each plan on held-out ``samples`` (``loss_and_hit``:
    hits only with ``tok`` and on samples the dense model answered right that carry their prompt).
    Candidates with identical rules are scored once."""
    from .apply import apply_plan, remove_plan

    done: dict[str, tuple[float, int]] = {}
    losses, hits = [], []
    for plan in tqdm(plans, desc="selection: held-out answers", disable=not progress):
        key = plan.digest()
        if key not in done:
            apply_plan(model, plan)
            try:
                scored = [loss_and_hit(model, tok, s) for s in samples]
            finally:
                remove_plan(model)
            done[key] = (sum(x for x, _ in scored) / len(samples), sum(bool(h) for _, h in scored))
        losses.append(done[key][0])
        hits.append(done[key][1])
    return losses, hits


@torch.no_grad()
def ppl_ratios(model, plans, stream: torch.Tensor, length: int, windows: int, progress: bool = False,
               order=None, stop=None) -> list[dict | None]:  # fmt: skip
    """Each plan's perplexity over the dense model's on the same ``windows`` windows of ``length``
    tokens of ``stream`` (T,): ``stats.paired_ratio`` dicts {"windows", "ratio", "lo", "hi", "a_higher"}.
    Plans are measured in ``order`` (indices; default all, in turn) until ``stop(ratio dict)`` is true;
    the unmeasured ones are None. Candidates with identical rules are measured once."""
    from ..metrics.perplexity import window_nlls
    from ..metrics.stats import paired_ratio
    from .apply import apply_plan, remove_plan

    remove_plan(model)
    dense = window_nlls(model, stream, length, windows)["nll"]
    done: dict[str, dict] = {}
    out: list[dict | None] = [None] * len(plans)
    for i in tqdm(list(range(len(plans)) if order is None else order), desc=f"selection: perplexity at {length}",
                  disable=not progress):  # fmt: skip
        key = plans[i].digest()
        if key not in done:
            apply_plan(model, plans[i])
            try:
                done[key] = paired_ratio(window_nlls(model, stream, length, windows)["nll"], dense)
            finally:
                remove_plan(model)
        out[i] = done[key]
        if stop is not None and stop(out[i]):
            break
    return out


def choose(losses, hits, ratios=None, ppl_tolerance: float = 0.05) -> int:
    """Index of the chosen candidate (see the module docstring); ``ratios``: perplexity ratios or None."""
    n = len(losses)
    if ratios is None:
        return min(range(n), key=lambda i: (-hits[i], losses[i]))
    ok = [i for i in range(n) if ratios[i] is not None and ratios[i] <= 1 + ppl_tolerance]
    if not ok:
        return min((i for i in range(n) if ratios[i] is not None), key=lambda i: ratios[i])
    return min(ok, key=lambda i: (-hits[i], losses[i]))


def select_by_validation(model, plans: list[Plan], samples, tok=None, ppl_stream=None, ppl_length: int = 0,
                         ppl_windows: int = 2, ppl_tolerance: float = 0.05,
                         progress: bool = False) -> tuple[Plan, dict]:  # fmt: skip
    """The chosen plan and {"losses", "hits", "ppl" (ratios or None)}, one entry per plan.

    ``samples``: held-out calibration samples (typically longer than any profile length);
    ``ppl_stream`` (T,) with ``ppl_length`` > 0: also rule out candidates whose perplexity at
    ``ppl_length`` is over ``1 + ppl_tolerance`` times dense (``ppl_windows`` paired windows).

    Perplexity is measured in ``choose``'s order (most hits, then least loss) and stops at the first
    admissible candidate, which is then ``choose``'s choice: the same plan as measuring every
    candidate, at one perplexity pass instead of one per candidate when the leader passes the guard.
    The unmeasured candidates' ratios are None."""
    losses, hits = answer_scores(model, plans, samples, tok, progress)
    ratios = None
    if ppl_stream is not None and ppl_length:
        order = sorted(range(len(plans)), key=lambda i: (-hits[i], losses[i]))
        got = ppl_ratios(model, plans, ppl_stream, ppl_length, ppl_windows, progress, order,
                         stop=lambda r: r["ratio"] <= 1 + ppl_tolerance)  # fmt: skip
        ratios = [None if r is None else r["ratio"] for r in got]
    best = choose(losses, hits, ratios, ppl_tolerance)
    return plans[best], {"losses": losses, "hits": hits, "ppl": ratios}
