"""Gradient-based attention influence (MoA, arXiv 2406.14909 §3.2), plus two cheap head scores.

For attention A (one head, rows softmax-normalised) and G = dL/dA, the first-order loss change
when entry A[i, j] is masked and its row renormalised is

    dL[i, j] = -A[i, j] * (G[i, j] - sum_k G[i, k] A[i, k]) / (1 - A[i, j]).

|dL| is summed over 64 x 64 blocks, per layer and KV head (query heads of a group add up), over
calibration samples, separately for each profile length. A is rebuilt one layer (and head) at a
time from the captured q and k, and G = dL/do @ v^T from the attention output's gradient, so the
peak memory is one head's T x T matrix.

Copy profile (retrieval heads, Wu et al. 2024, arXiv 2404.15574): while the model writes an answer
that also occurs in the prompt (the needle), a retrieval head attends to the prompt token it is
copying. ``copy[N]`` block-sums, per KV head, the attention A[i, j] from the row predicting answer
token t to the position j holding that token in each prompt occurrence of the answer. Dropping
those blocks is what loses retrieval, whatever the loss gradient says on a few samples.

Cheap scores for comparison: ``mass_outside`` (attention mass outside sink + local window,
DuoAttention/RazorAttention style) and ``induction`` (attention to the token after the previous
occurrence on repeated random tokens, RazorAttention's retrieval heads).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..layers.attention import Attention
from ..paths import atomic_write, load_torch

BLOCK = 64
SINK, LOCAL = 64, 256  # the window of the mass-outside score


@dataclass
class Profile:
    lengths: tuple[int, ...]
    influence: dict[int, torch.Tensor]  # N -> (L, Hkv, nb, nb) summed |dL| over samples
    counts: dict[int, int]  # samples accumulated per length
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (L, Hkv)
    done: int = 0  # calibration samples processed (resume point)
    copy: dict[int, torch.Tensor] = field(default_factory=dict)  # N -> (L, Hkv, nb, nb) copy attention

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, lambda tmp: torch.save(self.__dict__, tmp))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        state = load_torch(path, "profile")
        try:
            return cls(**state)
        except TypeError as e:
            raise ValueError(f"{path}: not a mixattn profile ({e})") from None


def influence(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """First-order loss change of masking each entry of A (rows of A sum to 1): same shape as A."""
    S = (G * A).sum(-1, keepdim=True)
    return -A * (G - S) / (1 - A).clamp_min(1e-6)


def _attention_matrix(q_TD, k_TD) -> torch.Tensor:
    T = q_TD.shape[0]
    s = (q_TD @ k_TD.T) * q_TD.shape[-1] ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool, device=q_TD.device).tril()
    return torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)


def _block_sum(x_TT: torch.Tensor, nb: int) -> torch.Tensor:
    T = x_TT.shape[0]
    x = F.pad(x_TT, (0, nb * BLOCK - T, 0, nb * BLOCK - T))
    return x.view(nb, BLOCK, nb, BLOCK).sum((1, 3))


def copy_sources(ids: torch.Tensor, start: int, probe: int = 4) -> list[tuple[int, int]]:
    """[(row, source)]: for every answer token ids[start + t], the row that predicts it (start - 1 + t)
    and the prompt position holding the same token in each occurrence of the answer in ids[:start].
    An occurrence is where the answer's first ``probe`` tokens appear; none: [] (nothing is copied)."""
    ans = ids[start:].tolist()
    if not ans:
        return []
    m = min(probe, len(ans))
    prompt = ids[:start].tolist()
    out = []
    for j in range(start - m + 1):
        if prompt[j : j + m] == ans[:m]:
            out += [(start - 1 + t, j + t) for t in range(len(ans)) if j + t < start and prompt[j + t] == ans[t]]
    return out


def _copy_blocks(A: torch.Tensor, pairs, nb: int) -> torch.Tensor:
    """(nb, nb): attention A[row, source] summed over copy ``pairs``, per 64 x 64 block."""
    out = torch.zeros(nb, nb, dtype=torch.float64)
    for i, j in pairs:
        out[i // BLOCK, j // BLOCK] += float(A[i, j])
    return out


def _mass_outside(A: torch.Tensor) -> float:
    """Mean over queries past sink+local of the attention mass outside the sink and local window."""
    T = A.shape[0]
    if T <= SINK + LOCAL:
        return 0.0
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    far = (j >= SINK) & (i - j >= LOCAL)
    return float((A * far)[SINK + LOCAL :].sum(-1).mean())


def attention_modules(model) -> list[Attention]:
    mods = [layer.attn for layer in model.layers]
    if not all(type(m) is Attention for m in mods):
        raise ValueError("profiling needs a model with dense (GQA) attention in every layer")
    return mods


@contextmanager
def capture(mods: list[Attention]) -> Iterator[list[tuple]]:
    """Record, per attention module and forward call, (q, k, v, o): q (B, H, T, D) and k (B, Hkv, T, D)
    after RoPE, v (B, Hkv, T, D), and o (B, H, T, D), the attention output before ``o_proj``, whose
    ``.grad`` after a backward is dL/do. Forward hooks owned by the profiler: the layers know nothing
    of profiling, and the hooks are gone when the block exits, even on an error."""
    caps: list[tuple] = []
    seen: dict[int, dict] = {}

    def on_v(mod, _inp, out):
        seen.setdefault(id(mod), {})["v"] = out.detach()

    def on_o(mod, inp):
        o = inp[0]
        if o.requires_grad:  # gradient profiling needs dL/do
            o.retain_grad()
        seen.setdefault(id(mod), {})["o"] = o

    def on_attn(mod, _inp, out):
        got = seen.pop(id(mod))
        q, k = out.graph_qk
        B, T, _ = got["o"].shape
        v = got["v"].view(B, T, k.shape[1], -1).transpose(1, 2)
        caps.append((q.detach(), k.detach(), v, _Grad(got["o"], q.shape[1])))

    handles = []
    for m in mods:
        # one key for the module's two sub-hooks: v_proj and o_proj report under the attention module
        handles.append(m.v_proj.register_forward_hook(lambda _m, i, o, m=m: on_v(m, i, o)))
        handles.append(m.o_proj.register_forward_pre_hook(lambda _m, i, m=m: on_o(m, i)))
        handles.append(m.register_forward_hook(on_attn))
    try:
        yield caps
    finally:
        for h in handles:
            h.remove()


class _Grad:
    """The captured attention output o (B, H, T, D): ``.grad`` is o_proj's input gradient, reshaped."""

    def __init__(self, o_BTX: torch.Tensor, num_heads: int):
        self._o, self._heads = o_BTX, num_heads  # o_proj's input (B, T, H*D): the tensor autograd fills

    @property
    def grad(self) -> torch.Tensor | None:
        g = self._o.grad
        return None if g is None else g.view(*g.shape[:2], self._heads, -1).transpose(1, 2)


def run(model, samples, lengths, path=None, resume: bool = False, progress: bool = True) -> Profile:
    """Profile ``model`` on calibration ``samples``; saved to ``path`` after each sample (resumable)."""
    mods = attention_modules(model)
    cfg = model.cfg
    L, Hkv, G = cfg.num_layers, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    prof = Profile(tuple(lengths), {N: torch.zeros(L, Hkv, math.ceil(N / BLOCK), math.ceil(N / BLOCK), dtype=torch.float64)
                                    for N in lengths}, {N: 0 for N in lengths})  # fmt: skip
    prof.copy = {N: torch.zeros_like(t) for N, t in prof.influence.items()}
    mass = torch.zeros(L, Hkv, dtype=torch.float64)
    if resume and path is not None and Path(path).is_file():
        prof = Profile.load(path)
        if not prof.copy and prof.done:
            raise ValueError(f"{path}: profile from an older version (no copy profile); delete it to re-profile")
        mass = prof.scores.get("mass_outside", mass) * max(1, prof.done)
    model.eval()
    bar = tqdm(total=len(samples), initial=prof.done, desc="profiling (gradient influence)", disable=not progress)
    try:
        for s in samples[prof.done :]:
            if s.length not in prof.influence:
                raise ValueError(f"calibration sample of length {s.length} is not among the profile lengths {lengths}")
            with capture(mods) as caps:
                logits = model(s.ids[None]).logits[0]
            target = s.ids[1:][s.answer_mask[:-1]]
            loss = F.cross_entropy(logits[:-1][s.answer_mask[:-1]].float(), target)
            loss.backward()
            nb = prof.influence[s.length].shape[-1]
            pairs = copy_sources(s.ids, int(s.answer_mask.nonzero()[0]) + 1)
            with torch.no_grad():
                for layer, (q, k, v, o) in enumerate(caps):
                    dO = o.grad
                    for h in range(cfg.num_heads):
                        kv = h // G
                        A = _attention_matrix(q[0, h], k[0, kv])
                        Gm = dO[0, h] @ v[0, kv].T  # dL/dA, since o = A v
                        prof.influence[s.length][layer, kv] += _block_sum(influence(A, Gm).abs(), nb).double()
                        mass[layer, kv] += _mass_outside(A) / G
                        if pairs:
                            prof.copy[s.length][layer, kv] += _copy_blocks(A, pairs, nb)
            model.zero_grad(set_to_none=True)
            prof.counts[s.length] += 1
            prof.done += 1
            prof.scores["mass_outside"] = mass / prof.done
            if path is not None:
                prof.save(path)
            bar.update(1)
    finally:
        bar.close()
    prof.scores["induction"] = induction_scores(model)
    if path is not None:
        prof.save(path)
    return prof


@torch.no_grad()
def induction_scores(model, n: int = 256, seed: int = 0) -> torch.Tensor:
    """RazorAttention retrieval score: on random tokens repeated twice, the mean attention from a
    token in the second copy to the token after its earlier occurrence. (L, Hkv), mean over the group."""
    mods = attention_modules(model)
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, cfg.vocab_size, (n,), generator=g)
    with capture(mods) as caps:
        model(torch.cat([r, r])[None])
    G = cfg.num_heads // cfg.num_kv_heads
    out = torch.zeros(cfg.num_layers, cfg.num_kv_heads)
    i = torch.arange(n + 1, 2 * n)
    for layer, (q, k, _, _) in enumerate(caps):
        for h in range(cfg.num_heads):
            A = _attention_matrix(q[0, h], k[0, h // G])
            out[layer, h // G] += A[i, i - n + 1].mean() / G
    return out


@torch.no_grad()
def mass_outside_scores(model, ids: torch.Tensor) -> torch.Tensor:
    """The cheap DuoAttention/RazorAttention-style score on one text (T,): (L, Hkv), no backward."""
    mods = attention_modules(model)
    cfg = model.cfg
    with capture(mods) as caps:
        model(ids[None])
    G = cfg.num_heads // cfg.num_kv_heads
    out = torch.zeros(cfg.num_layers, cfg.num_kv_heads)
    for layer, (q, k, _, _) in enumerate(caps):
        for h in range(cfg.num_heads):
            out[layer, h // G] += _mass_outside(_attention_matrix(q[0, h], k[0, h // G])) / G
    return out
