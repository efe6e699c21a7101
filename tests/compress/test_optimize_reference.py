"""The plan search's pieces against values written here: the candidate rule grid (deduplicated,
dense rules dropped), the dropped share of each 64 x 64 block (a loop over the sampled positions),
the loss matrix with both terms, the per-layer rule limit and the plan's provenance."""

import numpy as np
import torch

from mixattn.compress import optimize as opt
from mixattn.compress.plan import DENSE, HeadRule
from mixattn.compress.profile import Profile


def test_candidate_rules_are_deduplicated_and_never_dense():
    # N = 64: sink min(64, 64 // 16) = 4. (alpha 0, beta .5) -> span 32, kept 36; (32, 0) -> span 32, kept 36
    # (the same keys: dropped); (32, .5) -> span 64, kept 64 = dense (dropped)
    assert opt.candidate_rules((64,), alphas=(0, 32), betas=(0.0, 0.5)) == [DENSE, HeadRule(4, 0.0, 0.5)]
    # N = 1024: sink 64, every rule distinct and sparse; alpha 0 keeps its elastic rules
    assert opt.candidate_rules((1024,), alphas=(0, 32), betas=(0.0, 0.5)) == [
        DENSE, HeadRule(64, 0.0, 0.5), HeadRule(64, 32.0, 0.0), HeadRule(64, 32.0, 0.5)]  # fmt: skip


def _dropped_loop(rule, N, block=64, stride=8):
    nb = -(-N // block)
    pos = list(range(stride // 2, nb * block, stride))
    causal = np.zeros((nb, nb))
    kept = np.zeros((nb, nb))
    for i in pos:
        for j in pos:
            if j <= i < N:
                causal[i // block, j // block] += 1
                kept[i // block, j // block] += j < rule.sink or i - j < rule.span(N)
    return np.where(causal > 0, 1 - kept / np.maximum(causal, 1), 0.0)


def test_dropped_fraction_matches_a_loop_over_the_sampled_positions():
    for rule, N in ((HeadRule(0, 16.0, 0.0), 200), (HeadRule(8, 64.0, 0.0), 256), (HeadRule(5, 0.0, 0.25), 300), (DENSE, 128)):
        np.testing.assert_allclose(opt.dropped_fraction(rule, N).numpy(), _dropped_loop(rule, N), rtol=0, atol=1e-6)


def test_loss_matrix_adds_normalised_influence_and_weighted_copy_terms():
    L, H, N = 1, 2, 128
    g = torch.Generator().manual_seed(1)
    infl = torch.rand(L, H, 2, 2, generator=g, dtype=torch.float64).tril()
    copy = torch.rand(L, H, 2, 2, generator=g, dtype=torch.float64).tril()
    prof = Profile((N,), {N: infl}, {N: 1}, copy={N: copy})
    rules = [DENSE, HeadRule(0, 32.0, 0.0)]
    drop = [opt.dropped_fraction(r, N).double() for r in rules]
    want = np.zeros((L * H, len(rules)))
    for w, t in ((1.0, infl), (0.5, copy)):
        mean_total = float(t.sum((-1, -2)).mean())  # each term scaled so a head's mean total is 1
        for h in range(H):
            for r in range(len(rules)):
                want[h, r] += w * float((t[0, h] / mean_total * drop[r]).sum())
    np.testing.assert_allclose(opt.loss_matrix(prof, rules, copy_weight=0.5), want, rtol=1e-12)


def test_optimize_honours_the_rule_limit_and_records_its_provenance():
    N = 256
    nb = N // 64
    infl = torch.zeros(1, 3, nb, nb, dtype=torch.float64)
    infl[0, 0, nb - 1, 0] = 1.0  # head 0 needs the first block (sink), head 1 the one before the diagonal
    infl[0, 1, nb - 1, nb - 2] = 1.0
    infl[0, 2, nb - 1, nb - 1] = 1.0
    prof = Profile((N,), {N: infl}, {N: 1})
    rules = [DENSE, HeadRule(64, 0.0, 0.0), HeadRule(0, 128.0, 0.0)]
    free = opt.optimize(prof, 0.8, rules=rules)
    assert len(set(free.layers[0])) == 2  # the unconstrained optimum mixes two rules
    one = opt.optimize(prof, 0.8, rules=rules, max_rules_per_layer=1)
    assert len(set(one.layers[0])) == 1
    assert one.meta["method"] == "mixattn" and free.meta["budget"] == 0.8 and free.meta["rules"] == 3
    assert free.meta["budget_lengths"] == [N] and free.profile_lengths == (N,)
