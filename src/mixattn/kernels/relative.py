"""Causal attention with Transformer-XL relative position scores (Dai et al., "Transformer-XL:
Attentive Language Models Beyond a Fixed-Length Context", arXiv 1901.02860, section 3.3; the
learned-table variant is Shaw et al., "Self-Attention with Relative Position Representations",
arXiv 1803.02155):

    score(i, j) = (q_c,i . k_j + q_p,i . r_{i-j}) / sqrt(D),   j <= i,

where q_c = q + u (content bias) and q_p = q + v (position bias) are prepared by the layer, and
r_{i-j} is the layer's (projected) embedding of the distance i - j. The distance table r covers
0 .. Tk-1, so a query at position i (``q_offset + t``) reads row i - j for every visible key j.

Registered as op ``relative_attention`` with implementations ``sdpa`` (the position term becomes
SDPA's additive float mask; also ``auto``) and ``reference`` (explicit fp32 softmax).

Legend: B batch, H query heads, Hkv KV heads, Tq queries, Tk keys, D head dim, L = Tk distances.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import register


def _visible(Tq: int, Tk: int, q_offset: int, left_pad, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances i - j (Tq, Tk) and the mask of visible keys, (Tq, Tk) or (B, 1, Tq, Tk) with
    left padding (padded keys are never seen; a padded query sees only itself, as in causal_sdpa)."""
    q_pos = torch.arange(q_offset, q_offset + Tq, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(Tk, device=device)[None, :]  # (1, Tk)
    dist_QT = q_pos - k_pos
    ok = dist_QT >= 0
    if left_pad is not None and bool(left_pad.any()):
        pad = left_pad.to(device)[:, None, None]  # (B, 1, 1)
        ok = (ok & (k_pos >= pad)) | ((q_pos < pad) & (k_pos == q_pos))
        ok = ok[:, None]  # (B, 1, Tq, Tk)
    return dist_QT, ok


def position_scores(qp_BHQD: torch.Tensor, r_HLD: torch.Tensor, dist_QT: torch.Tensor) -> torch.Tensor:
    """q_p,i . r_{i-j} for every (query, key) pair: (B, H, Tq, Tk). Computed once per distance
    (B, H, Tq, L), then gathered; distances < 0 (masked keys) read row 0."""
    B, H, Tq, _ = qp_BHQD.shape
    per_dist_BHQL = torch.einsum("bhqd,hld->bhql", qp_BHQD, r_HLD.to(qp_BHQD.dtype))
    idx = dist_QT.clamp(0, r_HLD.shape[1] - 1).expand(B, H, Tq, dist_QT.shape[1])
    return per_dist_BHQL.gather(-1, idx)


def _check(qc, qp, k, v, r) -> None:
    if qc.shape != qp.shape:
        raise ValueError(f"content and position queries differ in shape: {tuple(qc.shape)} vs {tuple(qp.shape)}")
    if qc.shape[1] % k.shape[1] or k.shape != v.shape:
        raise ValueError(f"query heads {qc.shape[1]} vs k {tuple(k.shape)}, v {tuple(v.shape)}")
    if r.shape[0] != qc.shape[1] or r.shape[1] < k.shape[2] or r.shape[2] != qc.shape[3]:
        raise ValueError(f"distance table must be (H, >= Tk, D) = ({qc.shape[1]}, {k.shape[2]}, {qc.shape[3]}), "
                         f"got {tuple(r.shape)}")  # fmt: skip


@register("relative_attention", "sdpa")
def relative_attention_sdpa(qc_BHQD, qp_BHQD, k_BKTD, v_BKTD, r_HLD, q_offset: int = 0, left_pad=None):
    """(B, H, Tq, D) output. The scaled position term plus -inf on hidden keys is SDPA's float mask."""
    _check(qc_BHQD, qp_BHQD, k_BKTD, v_BKTD, r_HLD)
    Tq, Tk, D = qc_BHQD.shape[2], k_BKTD.shape[2], qc_BHQD.shape[3]
    dist_QT, ok = _visible(Tq, Tk, q_offset, left_pad, qc_BHQD.device)
    bias_BHQT = position_scores(qp_BHQD, r_HLD, dist_QT) / math.sqrt(D)
    bias_BHQT = bias_BHQT.masked_fill(~ok, float("-inf"))
    gqa = qc_BHQD.shape[1] != k_BKTD.shape[1]
    return F.scaled_dot_product_attention(qc_BHQD, k_BKTD, v_BKTD, attn_mask=bias_BHQT, enable_gqa=gqa)


register("relative_attention", "auto")(relative_attention_sdpa)


@register("relative_attention", "reference")
def relative_attention_reference(qc_BHQD, qp_BHQD, k_BKTD, v_BKTD, r_HLD, q_offset: int = 0, left_pad=None):
    """Explicit scores and softmax in fp32 (K/V expanded to every query head)."""
    _check(qc_BHQD, qp_BHQD, k_BKTD, v_BKTD, r_HLD)
    B, H, Tq, D = qc_BHQD.shape
    Tk, G = k_BKTD.shape[2], H // k_BKTD.shape[1]
    k = k_BKTD.float().repeat_interleave(G, dim=1)  # (B, H, Tk, D)
    v = v_BKTD.float().repeat_interleave(G, dim=1)
    dist_QT, ok = _visible(Tq, Tk, q_offset, left_pad, qc_BHQD.device)
    scores = qc_BHQD.float() @ k.transpose(-1, -2) + position_scores(qp_BHQD.float(), r_HLD.float(), dist_QT)
    scores = (scores / math.sqrt(D)).masked_fill(~ok, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(qc_BHQD.dtype)
