"""Perplexity over a token stream, in non-overlapping windows (each window starts fresh)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def corpus_tokens(corpus: str, tokenizer, n_tokens: int, split: str = "val") -> torch.Tensor:
    """The first ``n_tokens`` of a corpus split (validation by default: held out from training)."""
    from ..train.data import load_corpus

    data = load_corpus(corpus, tokenizer=tokenizer)
    stream = data.val if split == "val" else data.train
    if len(stream) < n_tokens:
        raise ValueError(f"corpus {corpus} {split} split has {len(stream)} tokens, fewer than {n_tokens}")
    return torch.from_numpy(stream[:n_tokens].astype("int64"))
