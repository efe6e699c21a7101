"""One decode query per row against a long cache: the fused SDPA kernel or two GEMMs, by measurement.

A decode step is memory-bound: it streams every cached key and value once. PyTorch's CPU SDPA
kernel does that well in fp32 and at short lengths, but in bf16 at long ones it falls behind two
plain GEMMs over the same bytes: on a Zen 4 (AVX-512 + AVX512_BF16, 1 thread) the GEMMs are 1.45x
faster at 4k keys and 2.1x at 8k, equal at 2k, 2.5x slower at 512, and slower at every length in
fp32 (``benchmarks/bench_decode.py``). So ``auto`` times both on first use per shape bucket
(``autotune.choose``) and keeps the faster.

``matmul_attention`` is the GEMM form: scores q k^T in the input dtype (the GEMM accumulates in
fp32; the scores are rounded to the dtype once, as transformers' eager attention does), softmax in
fp32, then the weights (rounded to the dtype) times v. Its error stays within the dtype's first-order
rounding bound of softmax attention, which the tests check against the fp32 reference.

Legend: B batch, K KV heads (of a group), G query heads per KV head, n keys, D head dim.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import autotune


def matmul_attention(q_BKGD, k_BKnD, v_BKnD, mask=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with the G query heads of a KV head on the query axis (no K/V
    expansion). ``mask`` broadcastable to (B, K, G, n), True where seen. -> (B, K, G, Dv).

    One 2-D GEMM per (row, KV head) rather than one batched call: the caches hand over strided views
    (the first n of ``cap`` slots), and a batched bf16 GEMM copies such operands first (about 4x
    slower at 4k keys), while a 2-D GEMM reads a row-strided operand in place."""
    B, K, G, _ = q_BKGD.shape
    pairs = [(b, h) for b in range(B) for h in range(K)]
    s_BKGn = torch.stack([q_BKGD[b, h] @ k_BKnD[b, h].T for b, h in pairs]).view(B, K, G, -1)
    # the softmax in fp32 at least: bf16/fp16 scores go up to fp32, fp64 ones stay fp64
    s_BKGn = s_BKGn.to(torch.promote_types(s_BKGn.dtype, torch.float32)) * (1 / math.sqrt(q_BKGD.shape[-1]))
    if mask is not None:
        s_BKGn = s_BKGn.masked_fill(~mask, float("-inf"))
    p_BKGn = s_BKGn.softmax(-1).to(v_BKnD.dtype)
    return torch.stack([p_BKGn[b, h] @ v_BKnD[b, h] for b, h in pairs]).view(B, K, G, -1)


def sdpa_attention(q_BKGD, k_BKnD, v_BKnD, mask=None) -> torch.Tensor:
    """The same function by the fused kernel."""
    return F.scaled_dot_product_attention(q_BKGD, k_BKnD, v_BKnD, attn_mask=mask)


ATTN: dict[str, Callable] = {"sdpa": sdpa_attention, "matmul": matmul_attention}


def fastest(op: str, q: torch.Tensor, n: int, impls: dict[str, Callable], *args) -> torch.Tensor:
    """``impls[name](*args)`` for the faster of ``impls`` ({"sdpa": ..., "matmul": ...}, each the
    whole call of ``op``) on this machine, for q (B, H, 1, D) over at most ``n`` keys (timed on first
    use per shape bucket); under autograd, ``sdpa``."""
    if q.requires_grad and torch.is_grad_enabled():
        return impls["sdpa"](*args)
    B, H, _, D = q.shape
    bucket = (B, H, D, 1 << max(n - 1, 0).bit_length())
    name = autotune.choose(op, bucket, {k: functools.partial(f, *args) for k, f in impls.items()}, q)
    return impls[name](*args)
