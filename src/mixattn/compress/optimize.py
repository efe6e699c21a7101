"""Choose one (sink, alpha, beta) rule per KV head: a MILP solved with scipy's HiGHS (MoA §3.3).

Variables x[h, r] in {0, 1} pick rule r for head h (exactly one per head). The objective is the
profiled influence of the attention blocks each rule drops, summed over profile lengths (each
length's profile averaged over its samples and scaled to a common range). Constraints: the mean
density over heads is at most the budget at every profile length; optionally at most
``max_rules_per_layer`` distinct rules in a layer (y[l, r] >= x[h, r], sum_r y[l, r] <= m), which
keeps kernels simple (MoA groups heads by rule).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from .plan import DENSE, HeadRule, Plan

ALPHAS = (0, 32, 64, 128, 256, 448, 512, 1024, 2048)  # beta 0: sink + short fixed windows (StreamingLLM heads)
BETAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75)


def candidate_rules(lengths, sink: int | None = None, alphas=ALPHAS, betas=BETAS) -> list[HeadRule]:
    """The rule grid (one sink for all, as MoA's 64; smaller for short profile lengths): the dense
    rule (full heads), sink + fixed short windows (beta 0) and elastic windows (alpha + beta N);
    rules identical at ``lengths`` are kept once."""
    sink = min(64, min(lengths) // 16) if sink is None else sink
    seen, rules = set(), [DENSE]
    for a in alphas:
        for b in betas:
            if a == 0 and b == 0:
                continue
            r = HeadRule(sink, float(a), b)
            key = tuple(r.kept(N) for N in lengths)
            if key not in seen and any(r.density(N) < 1 for N in lengths):
                seen.add(key)
                rules.append(r)
    return rules


def dropped_fraction(rule: HeadRule, N: int, block: int = 64, stride: int = 8) -> torch.Tensor:
    """(nb, nb): share of each block's causal entries the rule drops (sampled at ``stride``)."""
    nb = -(-N // block)
    pos = torch.arange(stride // 2, nb * block, stride)
    i, j = pos[:, None], pos[None, :]
    causal = (j <= i) & (i < N)
    kept = causal & ((j < rule.sink) | (i - j < rule.span(N)))
    per = block // stride
    c = causal.view(nb, per, nb, per).sum((1, 3)).float()
    k = kept.view(nb, per, nb, per).sum((1, 3)).float()
    return torch.where(c > 0, 1 - k / c.clamp_min(1), torch.zeros_like(c))


def loss_matrix(profile, rules, copy_weight: float = 0.0) -> np.ndarray:
    """(L * Hkv, R): profiled loss of the blocks each rule drops, summed over profile lengths, plus
    ``copy_weight`` times the retrieval (copy) attention it drops. Each term is scaled so that a
    head's mean total is 1 at every length: weight 1 counts both equally."""
    total = 0.0
    for N in profile.lengths:
        drop = torch.stack([dropped_fraction(r, N) for r in rules]).double()  # (R, nb, nb)
        terms = [(1.0, profile.influence[N])]
        if copy_weight:
            if N not in profile.copy:
                raise ValueError(f"profile has no copy attention at length {N}; re-profile with this version")
            terms.append((copy_weight, profile.copy[N]))
        for w, t in terms:
            t = t / t.sum(dim=(-1, -2)).mean().clamp_min(1e-30)  # (L, Hkv, nb, nb), mean head total 1
            total = total + w * torch.einsum("lhij,rij->lhr", t, drop)
    return total.reshape(-1, len(rules)).numpy()


def solve(loss: np.ndarray, dens: np.ndarray, budget: float, layer_of: np.ndarray | None = None,
          max_rules_per_layer: int | None = None, time_limit: float = 300.0) -> np.ndarray:  # fmt: skip
    """Pick a rule per head. loss (H, R); dens (R, lengths); returns (H,) rule indices."""
    H, R = loss.shape
    nl = dens.shape[1]
    best = dens.min(0)
    for n in range(nl):
        if best[n] > budget + 1e-12:
            raise ValueError(f"density {budget} cannot be met: the sparsest candidate rule keeps {best[n]:.3f}")
    nx = H * R
    c = loss.reshape(-1) / max(float(np.abs(loss).max()), 1e-30)
    eq = sp.kron(sp.eye(H), np.ones((1, R)))  # one rule per head
    cons = [LinearConstraint(eq, 1, 1), LinearConstraint(sp.csr_matrix(np.tile(dens.T, (1, H))), -np.inf, budget * H)]
    nvar = nx
    if max_rules_per_layer is not None:
        layers = np.unique(layer_of)
        ny = len(layers) * R
        nvar = nx + ny
        c = np.concatenate([c, np.zeros(ny)])
        rows = sp.hstack([sp.eye(nx), -sp.kron(sp.csr_matrix(np.eye(len(layers))[np.searchsorted(layers, layer_of)]),
                                                sp.eye(R))])  # x[h, r] - y[layer(h), r] <= 0  # fmt: skip
        cons = [LinearConstraint(sp.hstack([con.A, sp.csr_matrix((con.A.shape[0], ny))]), con.lb, con.ub) for con in cons]
        cons.append(LinearConstraint(rows, -np.inf, 0))
        cons.append(LinearConstraint(sp.hstack([sp.csr_matrix((len(layers), nx)), sp.kron(sp.eye(len(layers)),
                                                np.ones((1, R)))]), -np.inf, max_rules_per_layer))  # fmt: skip
    res = milp(c, constraints=cons, integrality=np.ones(nvar), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-4})  # fmt: skip
    if res.x is None:
        raise ValueError(f"plan search failed: {res.message}")
    return res.x[:nx].reshape(H, R).argmax(1)


def optimize(profile, density: float, rules=None, max_rules_per_layer: int | None = None, model_name: str = "",
             time_limit: float = 300.0, budget_lengths=None, copy_weight: float = 0.0) -> Plan:  # fmt: skip
    """The plan minimising profiled dropped influence (plus ``copy_weight`` x dropped retrieval
    attention) with mean density <= ``density`` at every profile length and every length in
    ``budget_lengths`` (e.g. the eval lengths: elastic rules then cannot drift below the budget's
    intent at lengths the profile did not see)."""
    lengths = tuple(sorted({*profile.lengths, *(budget_lengths or ())}))
    rules = rules or candidate_rules(lengths)
    L, Hkv = profile.influence[profile.lengths[0]].shape[:2]
    loss = loss_matrix(profile, rules, copy_weight)
    dens = np.array([[r.density(N) for N in lengths] for r in rules])
    choice = solve(loss, dens, density, np.repeat(np.arange(L), Hkv), max_rules_per_layer, time_limit)
    layers = tuple(tuple(rules[choice[l * Hkv + h]] for h in range(Hkv)) for l in range(L))
    objective = float(loss[np.arange(L * Hkv), choice].sum())
    meta = {"method": "mixattn", "budget": density, "objective": objective, "rules": len(rules),
            "budget_lengths": list(lengths), "copy_weight": copy_weight}  # fmt: skip
    return Plan(layers, model_name, tuple(profile.lengths), meta)


def pareto(profile, densities, **kw) -> list[Plan]:
    """epsilon-constraint sweep: one optimal plan per density budget."""
    return [optimize(profile, d, **kw) for d in densities]
