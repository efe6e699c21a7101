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

    def length(self, name: str) -> int:
        return self._lens.get(name, 0)

    def nbytes(self) -> int:
        """Bytes allocated (capacity, not just the filled part)."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())
