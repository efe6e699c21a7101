"""KV caches for decoding.

``KVCache`` is the dense baseline: one per layer, holding named append-only buffers (B, H, T, D)
that grow by doubling, so a decode step is an in-place write rather than a full copy. Attention
variants store what they need under their own names (``k``/``v``, ``k0``/``v0``... for BAM experts,
``router_probs`` for token-graph routers).

Legend: B batch, H heads, T cached tokens, D channels.
"""

from __future__ import annotations

import torch


class KVCache:
    """Named append-only (B, H, T, D) buffers for one layer."""

    def __init__(self, capacity: int = 0):
        self._bufs: dict[str, torch.Tensor] = {}
        self._lens: dict[str, int] = {}
        self._capacity = capacity  # initial T allocation; 0 means "the first chunk's length"

    def extend(self, name: str, x_BHTD: torch.Tensor) -> torch.Tensor:
        """Append ``x`` along T under ``name``; return everything cached so far (a view)."""
        n, t = self._lens.get(name, 0), x_BHTD.shape[2]
        buf = self._bufs.get(name)
        if buf is None or n + t > buf.shape[2]:
            cap = max(n + t, self._capacity, 2 * (buf.shape[2] if buf is not None else 0))
            new = x_BHTD.new_empty(*x_BHTD.shape[:2], cap, x_BHTD.shape[3])
            if buf is not None:
                new[:, :, :n] = buf[:, :, :n]
            self._bufs[name] = buf = new
        buf[:, :, n : n + t] = x_BHTD
        self._lens[name] = n + t
        return buf[:, :, : n + t]

    def nbytes(self) -> int:
        """Bytes allocated (capacity, not just the filled part)."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


class RaggedKVCache:
    """Per-KV-head ragged cache for sink + sliding-window attention (MoA's StaticCircularCache idea).

    Head h keeps ``cap_h = min(N, sink_h + span_h)`` slots for reference length N (prompt +
    max_new_tokens): ``sink_h`` static slots for positions < sink, then a circular window of
    ``span_h`` slots. All heads of a layer share one flat buffer (B, sum_h cap_h, D) per K and V, so
    the memory is the sum over heads, never a per-layer maximum. Keys are stored after RoPE at their
    original positions; each slot remembers its position, which makes the decode mask exact.
    """

    def __init__(self, sink: torch.Tensor, span: torch.Tensor, ref_len: int):
        self.sink = [int(s) for s in sink]
        self.span = [int(s) for s in span]
        self.ref_len = ref_len
        self.caps = [min(ref_len, s + w) for s, w in zip(self.sink, self.span)]
        self.offsets = [sum(self.caps[:h]) for h in range(len(self.caps))]
        self.k = self.v = self.pos = None
        self.length = 0  # tokens written so far

    def _alloc(self, like_BHTD: torch.Tensor) -> None:
        B, _, _, D = like_BHTD.shape
        total = sum(self.caps)
        self.k = like_BHTD.new_zeros(B, total, D)
        self.v = like_BHTD.new_zeros(B, total, D)
        self.pos = torch.full((total,), -1, dtype=torch.long, device=like_BHTD.device)

    def _slot(self, h: int, p: torch.Tensor) -> torch.Tensor:
        s, w, cap = self.sink[h], self.span[h], self.caps[h]
        if cap >= self.ref_len:  # a dense head: position == slot
            local = p
        else:
            local = torch.where(p < s, p, s + (p - s) % w)
        return self.offsets[h] + local

    def write(self, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> None:
        """Store T new tokens (positions length .. length+T-1). Only tokens some future query can
        still see are written, so no slot is written twice in one call."""
        if self.k is None:
            self._alloc(k_BHTD)
        T = k_BHTD.shape[2]
        p = torch.arange(self.length, self.length + T, device=k_BHTD.device)
        if self.length + T > self.ref_len:
            raise ValueError(f"ragged cache sized for {self.ref_len} tokens; got position {self.length + T - 1}")
        last = self.length + T - 1
        for h in range(len(self.caps)):
            s, w = self.sink[h], self.span[h]
            keep = (p < s) | (last - p < w) | torch.tensor(self.caps[h] >= self.ref_len)
            slots = self._slot(h, p[keep])
            self.k[:, slots] = k_BHTD[:, h, keep]
            self.v[:, slots] = v_BHTD[:, h, keep]
            self.pos[slots] = p[keep]
        self.length += T

    def attend(self, q_BHQD: torch.Tensor) -> torch.Tensor:
        """Attention of the newest Tq queries (positions length-Tq ..) over the cache: (B, H, Tq, D)."""
        B, H, Tq, D = q_BHQD.shape
        Hkv = len(self.caps)
        G = H // Hkv
        i = torch.arange(self.length - Tq, self.length, device=q_BHQD.device)[:, None]  # (Tq, 1)
        outs = []
        for h in range(Hkv):
            sl = slice(self.offsets[h], self.offsets[h] + self.caps[h])
            pos = self.pos[sl][None, :]  # (1, cap)
            ok = (pos >= 0) & (pos <= i) & ((pos < self.sink[h]) | (i - pos < self.span[h]))  # (Tq, cap)
            qh = q_BHQD[:, h * G : (h + 1) * G]  # (B, G, Tq, D)
            kh, vh = self.k[:, sl][:, None], self.v[:, sl][:, None]  # (B, 1, cap, D)
            outs.append(torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=ok))
        return torch.cat(outs, dim=1)

    def nbytes(self) -> int:
        """Bytes of K and V actually allocated (the per-slot positions are metadata, not counted)."""
        if self.k is None:
            return 0
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
