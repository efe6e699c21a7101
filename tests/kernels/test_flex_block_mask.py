"""The flex BlockMask of a (sink, span) rule, checked without compiling flex: the keys it lets each
query see (full blocks whole, partial blocks through mask_mod) are exactly the brute-force rule's.
Compiling flex takes seconds per shape on CPU; this check takes milliseconds, so it covers many
more shapes (several 128-token blocks, sinks and spans on both sides of block edges, GQA groups)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixattn.kernels.sparse import _rule_groups, flex_block_mask


def rule_visible(T, sink, span, G):
    """(H, T, T) bool: j <= i and (j < sink or i - j < span), query head h reading KV head h // G
    (the rule as written in the module docstring, on every (i, j) pair)."""
    H = len(sink) * G
    out = torch.zeros(H, T, T, dtype=torch.bool)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for h in range(H):
        s, w = int(sink[h // G]), int(span[h // G])
        out[h] = (j <= i) & ((j < s) | (i - j < w))
    return out


def visible_through(bm, T, H):
    """(H, T, T): what flex computes with ``bm``: keys in full blocks all; keys in partial blocks where mask_mod holds."""
    block = bm.BLOCK_SIZE[1]
    nq = -(-T // block)
    blk_of = torch.arange(T) // block
    h = torch.arange(H)[:, None, None]
    i = torch.arange(T)[None, :, None]
    j = torch.arange(T)[None, None, :]
    mod = bm.mask_mod(0, h, i, j)  # (H, T, T)
    full = torch.zeros(H, nq, nq, dtype=torch.bool)
    part = torch.zeros(H, nq, nq, dtype=torch.bool)
    for sel, num, idx in ((full, bm.full_kv_num_blocks, bm.full_kv_indices), (part, bm.kv_num_blocks, bm.kv_indices)):
        for hh in range(H):
            for m in range(nq):
                for c in idx[0, hh, m, : int(num[0, hh, m])].tolist():
                    assert not sel[hh, m, c], "a kv block listed twice"
                    sel[hh, m, c] = True
    assert not (full & part).any(), "a kv block both full and partial"
    fb = full[:, blk_of][:, :, blk_of]  # (H, T, T) expanded to tokens
    pb = part[:, blk_of][:, :, blk_of]
    return fb | (pb & mod)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    T=st.sampled_from([129, 200, 256, 300, 385, 520]),
    rules=st.lists(
        st.tuples(
            st.sampled_from([0, 1, 4, 127, 128, 129, 300]), st.sampled_from([1, 2, 5, 64, 127, 128, 129, 130, 200, 255, 256, 600])
        ),
        min_size=1,
        max_size=3,
    ),
    G=st.sampled_from([1, 2]),
)
def test_flex_block_mask_admits_exactly_the_rule(T, rules, G):
    sink = torch.tensor([s for s, _ in rules])
    span = torch.tensor([w for _, w in rules])
    bm = flex_block_mask(T, sink, span, G)
    H = len(rules) * G
    got = visible_through(bm, T, H)
    want = rule_visible(T, sink, span, G)
    bad = (got != want).nonzero()
    assert not len(bad), f"first mismatch (head, query, key) = {bad[0].tolist()}: flex {bool(got[tuple(bad[0])])}"


def test_full_blocks_are_wholly_visible_and_skipped_blocks_wholly_hidden():
    """At T = 512 with sink 256 and span 130: blocks inside the sink are full (mask_mod skipped), the
    diagonal block is partial, and blocks between sink and window are not listed at all."""
    T, sink, span = 512, torch.tensor([256]), torch.tensor([130])
    bm = flex_block_mask(T, sink, span, 1)
    full = {(m, c) for m in range(4) for c in bm.full_kv_indices[0, 0, m, : int(bm.full_kv_num_blocks[0, 0, m])].tolist()}
    part = {(m, c) for m in range(4) for c in bm.kv_indices[0, 0, m, : int(bm.kv_num_blocks[0, 0, m])].tolist()}
    # query block 3 (rows 384..511): sink blocks 0, 1 full; block 2 (256..383) partly in the window
    # (row 384 reaches back to 255, row 511 to 382); block 3 is the diagonal (partial)
    assert {(3, 0), (3, 1)} <= full and (3, 3) in part and (3, 2) in part
    assert (2, 2) in part and (2, 0) in full and (2, 1) in full and (1, 0) in full and (0, 0) in part
    assert not any(c > m for m, c in full | part)  # nothing above the diagonal


def test_rule_groups_collect_heads_with_equal_rules_in_first_seen_order():
    sink = torch.tensor([4, 0, 4, 4, 0])
    span = torch.tensor([8, 8, 8, 16, 8])
    assert _rule_groups(sink, span) == [[0, 2], [1, 4], [3]]
    assert _rule_groups(torch.tensor([1]), torch.tensor([2])) == [[0]]
