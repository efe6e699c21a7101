"""Prefill time, decode tokens/s and KV-cache bytes allocated, for a model with or without a plan."""

from __future__ import annotations

import time

import torch


@torch.no_grad()
def measure(model, context: int, new_tokens: int = 16, seed: int = 0) -> dict:
    ids = torch.randint(100, model.cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    N = context + new_tokens
    cache = model.new_cache(N)
    t0 = time.perf_counter()
    nxt = model(ids, cache, ref_len=N).logits[:, -1].argmax(-1)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(new_tokens):
        nxt = model(nxt[:, None], cache, start_pos=context + i, ref_len=N).logits[:, -1].argmax(-1)
    decode = time.perf_counter() - t0
    return {"prefill_s": prefill, "decode_tok_s": new_tokens / decode, "kv_bytes": model.kv_cache_bytes(cache)}
