"""Prefill time, decode tokens/s and KV-cache bytes allocated, for a model with or without a plan."""

from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def measure(model, context: int, new_tokens: int = 16, seed: int = 0, batch: int = 1, warmup: int = 256) -> dict:
    """Greedy decoding of ``new_tokens`` after a random prompt of (batch, context) tokens.

    A ``warmup``-token prefill and decode step run first (not timed), so one-time costs such as
    compiling the flex kernel (dynamic shapes: once for every length) do not count as prefill time.
    Returns prefill seconds, decode tokens/s summed over the batch (from the median step time), and
    the KV bytes allocated.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, model.cfg.vocab_size, (batch, context), generator=g)
    N = context + new_tokens

    def prefill(n_ctx, cache):
        return model(ids[:, :n_ctx], cache, ref_len=n_ctx + new_tokens, logits_to_keep=1).logits[:, -1].argmax(-1)

    if warmup:
        w = min(warmup, context)
        cache = model.new_cache(w + new_tokens)
        model(prefill(w, cache)[:, None], cache, start_pos=w, ref_len=w + new_tokens)
    cache = model.new_cache(N)
    t0 = time.perf_counter()
    nxt = prefill(context, cache)
    prefill_s = time.perf_counter() - t0
    steps = []
    for i in range(new_tokens):
        t0 = time.perf_counter()
        nxt = model(nxt[:, None], cache, start_pos=context + i, ref_len=N).logits[:, -1].argmax(-1)
        steps.append(time.perf_counter() - t0)
    step_s = statistics.median(steps)  # robust to a stray slow step on a shared machine
    return {"prefill_s": prefill_s, "decode_tok_s": batch / step_s, "kv_bytes": model.kv_cache_bytes(cache)}
