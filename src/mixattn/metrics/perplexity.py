"""Perplexity over a token stream: several non-overlapping windows, each scored from a fresh start.

``window_nlls`` scores ``windows`` windows of ``length`` tokens (a sparse plan sees reference length
``length``) and reports the perplexity of the pooled tokens with a 95% interval from the spread of
per-window mean NLLs (t distribution over windows; one window gives no interval).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .stats import t_interval


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int = 2048) -> float:
    """exp(mean next-token NLL) of ``ids`` (N,) scored in windows of ``context`` tokens."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"perplexity needs a 1-D stream of >= 2 tokens, got shape {tuple(ids.shape)}")
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, ids.numel() - 1, context):
        window = ids[start : start + context + 1]
        if window.numel() < 2:
            break
        logits = model(window[None, :-1]).logits[0].float()
        nll += float(F.cross_entropy(logits, window[1:], reduction="sum"))
        count += window.numel() - 1
    model.train(was_training)
    return math.exp(nll / count)


@torch.no_grad()
def window_nlls(model, ids: torch.Tensor, length: int, windows: int) -> dict:
    """Mean NLL of each of ``windows`` consecutive windows of ``length`` tokens of ``ids`` (T,).

    Returns {"length", "windows", "nll": [W floats], "ppl", "ppl_lo", "ppl_hi"}.
    """
    if length < 2 or windows < 1:
        raise ValueError(f"window_nlls needs length >= 2 and windows >= 1, got {length}, {windows}")
    if ids.dim() != 1 or ids.numel() < length * windows + 1:
        raise ValueError(f"need {length * windows + 1} tokens for {windows} windows of {length}, got {ids.numel()}")
    was_training = model.training
    model.eval()
    nlls = []
    for w in range(windows):
        win = ids[w * length : (w + 1) * length + 1]
        logits = model(win[None, :-1], ref_len=length).logits[0].float()
        nlls.append(float(F.cross_entropy(logits, win[1:])))
    model.train(was_training)
    mean, half = t_interval(nlls)
    return {"length": length, "windows": windows, "nll": nlls, "ppl": math.exp(mean),
            "ppl_lo": math.exp(mean - half), "ppl_hi": math.exp(mean + half)}  # fmt: skip

