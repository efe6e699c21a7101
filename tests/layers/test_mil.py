"""Attention pools over sets (ABMIL, ACMIL's multi-branch attention with STKIM): a slow per-bag
reference (outputs and gradients), set invariances (padding, permutation), the 1-branch == ABMIL
equivalence, and STKIM's masking invariants."""

import pytest
import torch

from mixattn.layers.mil import (
    ABMILPool,
    MILPoolConfig,
    MultiBranchAttentionPool,
    branch_diversity,
    stkim_mask,
    top_k_share,
)
from tests.conftest import assert_fp_close, grads

d, A = 6, 5


def _bags(B=3, N=7, lengths=(7, 4, 1)):
    x = torch.randn(B, N, d)
    mask = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def slow_pool(pool, x, mask):
    """Per bag and branch: gated scores by hand, softmax over the bag's real instances only."""
    s = pool.scorer
    feats, attns = [], []
    for b in range(x.shape[0]):
        xb = x[b, mask[b]]  # (n, d)
        h = torch.tanh(xb @ s.V.weight.T + s.V.bias)
        if s.U is not None:
            h = h * torch.sigmoid(xb @ s.U.weight.T + s.U.bias)
        a = torch.softmax((h @ s.w.weight.T + s.w.bias).T, dim=-1)  # (M, n)
        full = torch.zeros(a.shape[0], x.shape[1])
        full[:, mask[b]] = a
        attns.append(full)
        feats.append(a @ xb)
    return torch.stack(feats), torch.stack(attns)


@pytest.mark.parametrize("scorer", ["gated", "tanh"])
@pytest.mark.parametrize("M", [1, 4])
def test_pool_matches_slow_reference_outputs_and_grads(scorer, M):
    pool = MultiBranchAttentionPool(MILPoolConfig(in_dim=d, attn_dim=A, num_branches=M, scorer=scorer))
    x, mask = _bags()
    x.requires_grad_()
    out = pool(x, mask)
    feats, attn = slow_pool(pool, x, mask)
    assert out.branch_feats.shape == (3, M, d) and out.bag_feat.shape == (3, d) and out.attn.shape == (3, M, 7)
    assert_fp_close(out.branch_feats, feats, terms=A + 7)
    assert_fp_close(out.attn, attn, terms=A + 7)
    assert_fp_close(out.bag_feat, (attn.mean(1, keepdim=True) @ x)[:, 0], terms=A + 7 + M)
    # the score bias shifts every score of a branch alike: softmax ignores it (zero gradient, no scale to compare)
    params = [x, *(p for name, p in pool.named_parameters() if name != "scorer.w.bias")]
    for ga, gb in zip(grads(out.branch_feats, params), grads(feats, params)):
        assert_fp_close(ga, gb, terms=4 * (A + 7), chain=8)


def test_one_branch_without_masking_equals_abmil():
    ab = ABMILPool(d, A)
    mba = MultiBranchAttentionPool(MILPoolConfig(in_dim=d, attn_dim=A, num_branches=1, mask_rate=0.0))
    mba.load_state_dict(ab.state_dict())
    x, mask = _bags()
    a, b = ab(x, mask), mba(x, mask)
    torch.testing.assert_close(a.bag_feat, b.bag_feat)
    torch.testing.assert_close(a.attn, b.attn)


def test_padding_is_never_attended_and_does_not_matter():
    pool = MultiBranchAttentionPool(MILPoolConfig(in_dim=d, attn_dim=A, num_branches=3))
    x, mask = _bags()
    out = pool(x, mask)
    assert (out.attn[~mask[:, None].expand_as(out.attn)] == 0).all()
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(3, 3))
    junk = x.clone()
    junk[~mask] = 1e3 * torch.randn(int((~mask).sum()), d)
    torch.testing.assert_close(pool(junk, mask).bag_feat, out.bag_feat)
    alone = pool(x[1:2, :4]).bag_feat  # bag 1 unpadded
    assert_fp_close(out.bag_feat[1:2], alone, terms=A + 7)


def test_permuting_instances_permutes_attention_only():
    pool = MultiBranchAttentionPool(MILPoolConfig(in_dim=d, attn_dim=A, num_branches=3))
    x = torch.randn(2, 6, d)
    perm = torch.randperm(6)
    a, b = pool(x), pool(x[:, perm])
    assert_fp_close(b.bag_feat, a.bag_feat, terms=A + 6)
    assert_fp_close(b.attn, a.attn[:, :, perm], terms=A + 6)


# ---------------------------------------------------------------- STKIM


@pytest.mark.parametrize("top_k,rate", [(3, 0.6), (10, 0.6), (2, 0.9), (5, 0.2)])
def test_stkim_masks_a_random_share_of_the_top_k_real_instances(top_k, rate):
    x, mask = _bags(B=4, N=9, lengths=(9, 5, 2, 1))
    scores = torch.randn(4, 3, 9)
    masked = stkim_mask(scores, mask, top_k, rate, torch.Generator().manual_seed(0))
    for b in range(4):
        n = int(mask[b].sum())
        k = min(top_k, n)
        want = int(k * rate)  # < k <= n: never a whole bag
        for m in range(3):
            hit = masked[b, m].nonzero().flatten()
            assert len(hit) == want
            real = scores[b, m].masked_fill(~mask[b], float("-inf"))
            top = set(real.topk(k).indices.tolist())
            assert set(hit.tolist()) <= top


def test_stkim_draws_uniformly_among_the_top_k():
    """top_k 3, rate 0.6 -> one of the top 3 masked, each with probability 1/3."""
    scores = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0]]]).expand(3000, 1, 5)
    masked = stkim_mask(scores, torch.ones(3000, 5, dtype=torch.bool), 3, 0.6, torch.Generator().manual_seed(1))
    freq = masked[:, 0].float().mean(0)
    sigma = (1 / 3 * 2 / 3 / 3000) ** 0.5
    assert torch.allclose(freq[:3], torch.full((3,), 1 / 3), atol=5 * sigma)
    assert (freq[3:] == 0).all()


def test_stkim_gives_masked_mass_to_the_others_in_training_only():
    pool = MultiBranchAttentionPool(MILPoolConfig(in_dim=d, attn_dim=A, num_branches=2, top_k=3, mask_rate=0.6))
    x, mask = _bags()
    pool.train()
    out = pool(x, mask, generator=torch.Generator().manual_seed(3))
    assert out.masked.any()
    assert (out.attn[out.masked] == 0).all()
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(3, 2))
    full = torch.softmax(out.scores.masked_fill(~mask[:, None], float("-inf")), -1)
    kept = mask[:, None] & ~out.masked
    renorm = full * kept / (full * kept).sum(-1, keepdim=True)  # the removed mass is shared pro rata
    assert_fp_close(out.attn, renorm, terms=A + 7)
    pool.eval()
    ev = pool(x, mask)
    assert not ev.masked.any()
    assert_fp_close(ev.attn, full, terms=A + 7)


def test_branch_diversity_and_top_k_share():
    same = torch.softmax(torch.randn(2, 1, 5), -1).expand(2, 3, 5)
    torch.testing.assert_close(branch_diversity(same), torch.tensor(1.0))
    disjoint = torch.eye(3)[None]  # three branches on three different instances
    torch.testing.assert_close(branch_diversity(disjoint), torch.tensor(0.0))
    attn = torch.softmax(torch.randn(2, 3, 6), -1).requires_grad_()
    slow = torch.stack([torch.cosine_similarity(attn[:, i], attn[:, j], dim=-1)
                        for i in range(3) for j in range(i + 1, 3)]).mean()  # fmt: skip
    got = branch_diversity(attn)
    assert_fp_close(got, slow, terms=6)
    assert_fp_close(grads(got, attn)[0], grads(slow, attn)[0], terms=36)
    want = attn.sort(-1, descending=True).values[..., :2].sum(-1)
    torch.testing.assert_close(top_k_share(attn, 2), want)


def test_bad_config_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="mask_rate"):
        MILPoolConfig(in_dim=4, mask_rate=1.0)
    with pytest.raises(ValueError, match="num_branches"):
        MILPoolConfig(in_dim=4, num_branches=0)
    with pytest.raises(ValueError, match="rate"):
        stkim_mask(torch.zeros(1, 1, 3), torch.ones(1, 3, dtype=torch.bool), 3, 1.0)
    with pytest.raises(ValueError, match="scorer"):
        MILPoolConfig(in_dim=4, scorer="softmax")
    pool = ABMILPool(d, A)
    with pytest.raises(ValueError, match="bags"):
        pool(torch.randn(3, d))
    with pytest.raises(ValueError, match="at least one instance"):
        pool(torch.randn(2, 3, d), torch.tensor([[True, False, False], [False, False, False]]))
