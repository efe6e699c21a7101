"""Test doubles: a word-level tokenizer that glues the leading space to the next word (GPT-2 style),
a scripted model that emits a chosen continuation, and a small real-text haystack."""

import random as _random
import re
from types import SimpleNamespace

import numpy as np
import torch

import mixattn


class WordTok:
    """``\\s?\\S+`` pieces, so ``" 1234567"`` is one token including its space."""

    eos_token_id = 0

    def __init__(self):
        self.vocab, self.inv = {"<eos>": 0}, ["<eos>"]

    def encode(self, text):
        out = []
        for piece in re.findall(r"\s?\S+|\s+", text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.inv)
                self.inv.append(piece)
            out.append(self.vocab[piece])
        return out

    def decode(self, ids):
        return "".join(self.inv[int(i)] for i in ids)


class ScriptedLM(torch.nn.Module):
    """Predicts ``script[p + 1]`` at position p (logit 30 on it, 0 elsewhere): a model that 'says' the
    script. ``forward(ids, cache, start_pos, ref_len)`` follows MixtureLM's signature."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script, self.cfg = list(script), SimpleNamespace(vocab_size=vocab_size, max_seq_len=1 << 16)

    def new_cache(self, ref_len=None):
        return [torch.zeros(1)]

    def forward(self, ids, cache=None, start_pos=0, ref_len=None, **kw):
        T = ids.shape[1]
        logits = torch.zeros(1, T, self.cfg.vocab_size)
        for t in range(T):
            p = start_pos + t + 1
            if p < len(self.script):
                logits[0, t, self.script[p]] = 30.0
        return SimpleNamespace(logits=logits)


def haystack(tok, n_tokens=40000):
    """Real text (the stdlib's own source) as a token stream."""
    import argparse
    import inspect
    import typing

    text = "".join(inspect.getsource(m) for m in (_random, argparse, typing))
    ids = tok.encode(text)
    while len(ids) < n_tokens:
        ids = ids + ids
    return np.array(ids[:n_tokens])


def byte_tok():
    return mixattn.ByteTokenizer()
