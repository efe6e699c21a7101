"""``head_sparse_attention``: causal attention computed only for the (token, head) pairs selected.

Used by Mixture-of-Head attention (MoH, arXiv 2410.11842). For each head, the tokens that selected
it are gathered (in position order) and attend to all earlier keys of that head's KV head, in
query chunks: a chunk whose last query sits at position p only reads keys [0, p], and only the
diagonal tail [first position, p] needs a causal mask. Cost therefore scales with the number of
active (token, head) pairs, unlike the mask-after-compute reference.

Legend: B batch, H query heads, Hkv KV heads, T tokens, D head dim, n selected tokens, C chunk.
"""

from __future__ import annotations

import torch

from . import register

CHUNK = 128  # queries per matmul; 64-256 measured equal within noise on a 2-core CPU


def _one_head(q_nD, pos_n, k_TD, v_TD, scale: float, chunk: int) -> torch.Tensor:
    """Attention for n gathered queries at positions ``pos_n`` (ascending) against one KV head."""
    outs = []
    for s in range(0, q_nD.shape[0], chunk):
        pos_C = pos_n[s : s + chunk]
        first, last = int(pos_C[0]), int(pos_C[-1]) + 1
        scores_CL = (q_nD[s : s + chunk] * scale) @ k_TD[:last].T  # (C, last)
        # Keys before ``first`` are visible to every query of the chunk: only the tail needs masking.
        key_pos = torch.arange(first, last, device=pos_C.device)
        scores_CL[:, first:].masked_fill_(pos_C[:, None] < key_pos[None, :], float("-inf"))
        outs.append(torch.softmax(scores_CL, dim=-1) @ v_TD[:last])  # (C, D)
    return torch.cat(outs, dim=0)


@register("head_sparse_attention", "gather")
def head_sparse_attention_gather(
    q_BHTD: torch.Tensor,
    k_BKTD: torch.Tensor,
    v_BKTD: torch.Tensor,
    active_BTH: torch.Tensor,
    q_offset: int = 0,
    left_pad: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Args: q (B, H, T, D) at positions ``q_offset ..``; k, v (B, Hkv, q_offset+T, D); active (B, T, H)
    bool; left_pad (B,) padding tokens at the start of each row (never keys; their queries give
    zeros). Returns (B, T, H, D), zero where a head is inactive. Differentiable (plain autograd)."""
    B, H, T, D = q_BHTD.shape
    group = H // k_BKTD.shape[1]
    scale = D**-0.5
    rows = []
    for b in range(B):
        pad = int(left_pad[b]) if left_pad is not None else 0  # the row's keys start at index pad
        heads = []
        for h in range(H):
            pos_n = active_BTH[b, :, h].nonzero().squeeze(1)  # (n,) ascending positions
            pos_n = pos_n[pos_n + q_offset >= pad]
            out_TD = q_BHTD.new_zeros(T, D)
            if pos_n.numel():
                kv = h // group
                o_nD = _one_head(
                    q_BHTD[b, h, pos_n], pos_n + q_offset - pad, k_BKTD[b, kv, pad:], v_BKTD[b, kv, pad:], scale, chunk
                )
                out_TD = out_TD.index_put((pos_n,), o_nD)
            heads.append(out_TD)
        rows.append(torch.stack(heads, dim=1))  # (T, H, D)
    return torch.stack(rows, dim=0)  # (B, T, H, D)


register("head_sparse_attention", "auto")(head_sparse_attention_gather)
