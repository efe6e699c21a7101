"""``sparse_attention``: causal attention where each KV head keeps a sink plus a sliding window.

Query i (position) sees key j when j <= i and (j < sink_h or i - j < span_h), with (sink_h, span_h)
the rule of the query head's KV head (query head h reads KV head h // G, the GQA convention).
Implementations:

- ``reference``: SDPA with a per-head boolean mask built straight from the rule (ground truth);
  handles left padding and a query offset.
- ``blocked``: per KV head, the sink keys and, for each query block, only the window keys it can
  see (a zero-copy ``unfold`` of the keys), in one batched matmul with exact masks at the edges.
  Cost is O(T * (sink + span + block)) per head; differentiable (profiling, sparse training).
- ``flex``: ``flex_attention`` with a BlockMask built analytically from the rule (no T x T mask
  materialisation), compiled once with dynamic shapes. Inference only on CPU (no flex backward).
  Sequences shorter than one flex block (``FLEX_MIN_LEN``) go to ``reference`` instead: with a
  single block there is nothing to skip, and torch 2.13's compiled CPU kernel is wrong there under
  AVX2 code (``ATEN_CPU_CAPABILITY=avx2``): NaN or errors of about 2 whenever T < 128, T % 16 == 8
  and D is 8 or 16 (measured: T = 1..399 at D = 8, 16 and D = 4..128 at T < 128; docs/testing.md).

Signature: (q (B, H, T, D), k, v (B, Hkv, T, D), sink (Hkv,), span (Hkv,), left_pad (B,) | None)
-> (B, H, T, D). Padded query rows return zeros.

Legend: B batch, H query heads, Hkv KV heads, G = H / Hkv, T tokens, D head dim, C query block.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import register

BLOCK = 128  # query block of the blocked kernel; flex uses its own 128 default
FLEX_MIN_LEN = 128  # shorter sequences are one flex block: exact reference instead (see the docstring)


def span_at(alpha: float, beta: float, N: int) -> int:
    """MoA's elastic span at reference length N: min(N, max(1, floor(alpha + beta N))). The one
    definition of the rule; plans (``HeadRule.span``), layers (``SparseSpec``) and caches use it."""
    return min(N, max(1, math.floor(alpha + beta * N)))


def rule_mask(T: int, sink: torch.Tensor, span: torch.Tensor, q_offset: int = 0, Tk: int | None = None):
    """Boolean (Hkv, T, Tk) mask: True where query (position q_offset + t) may see key j."""
    Tk = Tk if Tk is not None else q_offset + T
    i = torch.arange(q_offset, q_offset + T, device=sink.device)[:, None]
    j = torch.arange(Tk, device=sink.device)[None, :]
    causal = j <= i
    keep = (j[None] < sink[:, None, None]) | ((i - j)[None] < span[:, None, None])
    return causal[None] & keep


@register("sparse_attention", "reference")
def sparse_reference(q, k, v, sink, span, left_pad=None, q_offset: int = 0):
    B, H, T, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    masks = []
    for b in range(B):
        pad = int(left_pad[b]) if left_pad is not None else 0
        # positions count from the first real token; padded keys are never visible
        m = rule_mask(T, sink, span, q_offset - pad, Tk - pad)  # (Hkv, T, Tk - pad)
        m = F.pad(m, (pad, 0), value=False)  # padded keys: never visible (dim 1 is the query axis)
        m[:, torch.arange(T) < pad - q_offset, 0] = True  # padded query rows: any key, zeroed below
        masks.append(m.repeat_interleave(G, dim=0))  # (H, T, Tk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.stack(masks), enable_gqa=G > 1)
    if left_pad is not None:
        rows = torch.arange(T, device=q.device)[None, :] >= (left_pad[:, None] - q_offset)  # (B, T) real rows
        out = out * rows[:, None, :, None].to(out.dtype)
    return out


def _per_sample(kernel):
    """Run ``kernel`` on each sample with its left padding sliced off (exact; padded rows are zero)."""

    @functools.wraps(kernel)
    def run(q, k, v, sink, span, left_pad=None):
        if left_pad is None or not bool(left_pad.any()):
            return kernel(q, k, v, sink, span)
        out = torch.zeros_like(q)
        for b in range(q.shape[0]):
            p = int(left_pad[b])
            out[b : b + 1, :, p:] = kernel(q[b : b + 1, :, p:], k[b : b + 1, :, p:], v[b : b + 1, :, p:], sink, span)
        return out

    return run


def _blocked_head(q_BGTD, k_BTD, v_BTD, sink: int, span: int, block: int) -> torch.Tensor:
    """One KV head and its G query heads: (B, G, T, D) -> (B, G, T, D)."""
    B, G, T, D = q_BGTD.shape
    scale = D**-0.5
    nb = -(-T // block)
    Tq = nb * block
    sink = min(sink, T)
    win = min(span, T) + block - 1  # keys a query block can see through its window
    # keys padded so window m is k_pad[m*block : m*block + win] = positions m*block - (span-1) ...
    lead = min(span, T) - 1
    k_pad = F.pad(k_BTD, (0, 0, lead, Tq - T))  # (B, lead + Tq, D)
    v_pad = F.pad(v_BTD, (0, 0, lead, Tq - T))
    k_win = k_pad.unfold(1, win, block)  # (B, nb, D, win) view
    v_win = v_pad.unfold(1, win, block)  # (B, nb, D, win)
    q_blk = F.pad(q_BGTD, (0, 0, 0, Tq - T)).view(B, G, nb, block, D).permute(0, 2, 1, 3, 4)  # (B, nb, G, C, D)
    q_blk = q_blk.reshape(B, nb, G * block, D) * scale

    i = torch.arange(Tq, device=q_BGTD.device).view(nb, 1, block)  # query positions per block
    j = (torch.arange(nb, device=i.device) * block).view(nb, 1, 1) - lead + torch.arange(win, device=i.device)
    win_ok = (j >= sink) & (j <= i.transpose(1, 2)) & (i.transpose(1, 2) - j < span)  # (nb, C, win)
    scores = [torch.matmul(q_blk, k_win)]  # (B, nb, G*C, win)
    masks = [win_ok.repeat(1, G, 1)]
    if sink > 0:
        js = torch.arange(sink, device=i.device)
        sink_ok = js[None, None, :] <= i.transpose(1, 2)  # (nb, C, sink); window part excludes j < sink
        scores.insert(0, torch.matmul(q_blk, k_BTD[:, :sink].transpose(1, 2)[:, None]))
        masks.insert(0, sink_ok.repeat(1, G, 1))
    s = torch.cat(scores, dim=-1).masked_fill(~torch.cat(masks, dim=-1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = torch.matmul(p[..., sink:], v_win.transpose(2, 3))  # (B, nb, G*C, D)
    if sink > 0:
        out = out + torch.matmul(p[..., :sink], v_BTD[:, :sink][:, None])
    out = out.view(B, nb, G, block, D).permute(0, 2, 1, 3, 4).reshape(B, G, Tq, D)
    return out[:, :, :T]


@register("sparse_attention", "blocked")
@_per_sample
def sparse_blocked(q, k, v, sink, span, block: int = BLOCK):
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    outs = []
    for h in range(Hkv):
        s, w = int(sink[h]), int(span[h])
        qg = q[:, h * G : (h + 1) * G]
        if s + w >= T:  # every key visible: plain causal attention (flash kernel)
            outs.append(F.scaled_dot_product_attention(qg, k[:, h : h + 1], v[:, h : h + 1], is_causal=True,
                                                       enable_gqa=G > 1))  # fmt: skip
        else:
            outs.append(_blocked_head(qg, k[:, h], v[:, h], s, w, min(block, max(16, T))))
    return torch.cat(outs, dim=1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_block_mask(T: int, sink: torch.Tensor, span: torch.Tensor, G: int, block: int = 128):
    """A BlockMask for the rule, built from analytic kv-block lists (no T x T mask is materialised)."""
    from torch.nn.attention.flex_attention import BlockMask

    device = sink.device
    nq = -(-T // block)
    qb = torch.arange(nq, device=device)
    sink_h, span_h = sink.repeat_interleave(G), span.repeat_interleave(G)  # per query head
    # key blocks that can intersect sink U window for query block m: [0, sink_blocks) U [first_win, m]
    sink_blocks = (-(-sink_h // block)).clamp(max=nq)[:, None]  # (H, 1)
    first_win = ((qb[None] * block - span_h[:, None] + 1).clamp(min=0)) // block  # (H, nq)
    cols = torch.arange(nq, device=device)[None, None, :]  # candidate kv blocks
    want = (cols < sink_blocks[..., None]) | ((cols >= first_win[..., None]) & (cols <= qb[None, :, None]))
    want &= cols <= qb[None, :, None]
    # full blocks (strictly causal and wholly inside the sink or the window) skip mask_mod entirely
    inside_sink = (cols + 1) * block <= sink_h[:, None, None]
    inside_win = ((qb[None, :, None] + 1) * block - 1 - cols * block) < span_h[:, None, None]
    full = want & (cols < qb[None, :, None]) & (inside_sink | inside_win)
    partial = want & ~full

    def blocks(sel):
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # selected first
        return sel.sum(-1).to(torch.int32)[None], order[None]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < sink_h[h]) | (q_idx - kv_idx < span_h[h]))

    num, idx = blocks(partial)
    full_num, full_idx = blocks(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, T))  # fmt: skip


def _rule_groups(sink: torch.Tensor, span: torch.Tensor) -> list[list[int]]:
    """KV heads grouped by equal (sink, span), in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for h, rule in enumerate(zip(sink.tolist(), span.tolist())):
        groups.setdefault(rule, []).append(h)
    return list(groups.values())


@register("sparse_attention", "flex")
@_per_sample
def sparse_flex(q, k, v, sink, span):
    """One compiled flex call per group of KV heads with equal rules. A single call over heads of
    unequal spans runs slower (1.6x vs 2.1x dense at 8k, density 0.25, CPU): the kernel splits
    (head, query block) work evenly across threads, so wide heads leave threads idle."""
    B, H, T, D = q.shape
    if T < FLEX_MIN_LEN:  # per sample (after _per_sample slices the padding off): short rows too
        return sparse_reference(q, k, v, sink, span)
    G = H // k.shape[1]
    groups = _rule_groups(sink, span)
    if len(groups) == 1:  # a uniform layer: one call, no gather
        bm = flex_block_mask(T, sink.to(q.device), span.to(q.device), G)
        return _compiled_flex()(q, k, v, block_mask=bm, enable_gqa=G > 1)
    out = q.new_empty(B, H, T, D)
    for heads in groups:
        idx = torch.tensor(heads, device=q.device)
        q_idx = (idx[:, None] * G + torch.arange(G, device=q.device)).flatten()  # this group's query heads
        bm = flex_block_mask(T, sink[idx].to(q.device), span[idx].to(q.device), G)
        out[:, q_idx] = _compiled_flex()(q[:, q_idx], k[:, idx], v[:, idx], block_mask=bm, enable_gqa=G > 1)
    return out
