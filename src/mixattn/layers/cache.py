"""KV caches for decoding.

``KVCache`` is the dense baseline: one per layer, holding named append-only buffers (B, H, T, D)
that grow by doubling, so a decode step is an in-place write rather than a full copy. Attention
variants store what they need under their own names (``k``/``v``, ``k0``/``v0``... for BAM experts,
``router_probs`` for token-graph routers).

Legend: B batch, H heads, T cached tokens, D channels.
"""

from __future__ import annotations

import torch


def check_left_pad(left_pad: torch.Tensor | None, B: int, length: int) -> torch.Tensor | None:
    """Validate left padding (B,) for a batch whose first chunk has ``length`` tokens; None if no row is padded."""
    if left_pad is None:
        return None
    if not isinstance(left_pad, torch.Tensor) or left_pad.shape != (B,) or left_pad.is_floating_point():
        raise ValueError(f"left_pad must be an integer tensor of shape ({B},), got {left_pad!r}")
    if int(left_pad.min()) < 0 or int(left_pad.max()) >= length:
        raise ValueError(f"left_pad values must be in [0, {length}) so every row keeps a token, got {left_pad.tolist()}")
    return left_pad if bool(left_pad.any()) else None


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
    original positions.

    ``left_pad`` (B,), given with the first write, supports left-padded batches as the sparse
    kernels do: row b's positions count
    from its first real token (index ``left_pad[b]``), so its sink is that token onwards and padded
    keys are never stored or seen. RoPE is relative, so keys keep their absolute rotation.

    Heads with equal capacity sit next to each other in the buffer, so each such group is one
    strided (B, heads, cap, D) view and a decode step costs one SDPA call per distinct capacity
    (one per layer for a uniform plan), without masks: the first ``min(length, cap)`` slots of a
    head always hold exactly the keys its newest query may see (``decode_view``). The cache only
    stores; the attention over it is ``kernels.ragged``.
    """

    def __init__(self, sink: torch.Tensor, span: torch.Tensor, ref_len: int):
        self.sink = [int(s) for s in sink]
        self.span = [int(s) for s in span]
        self.ref_len = ref_len
        self.caps = [min(ref_len, s + w) for s, w in zip(self.sink, self.span)]
        self.order = sorted(range(len(self.caps)), key=lambda h: self.caps[h])  # buffer order: by capacity
        self.offsets = [0] * len(self.caps)
        self.groups: list[tuple[int, int]] = []  # (number of heads, cap), in buffer order
        start = 0
        for h in self.order:
            if not self.groups or self.groups[-1][1] != self.caps[h]:
                self.groups.append((0, self.caps[h]))
            self.groups[-1] = (self.groups[-1][0] + 1, self.caps[h])
            self.offsets[h] = start
            start += self.caps[h]
        self.k = self.v = None
        self._perm = None  # (order, inverse) index tensors when the buffer order is not the head order
        self.left_pad = None  # (B,) set by the first write
        self._extra = KVCache(ref_len)  # other per-token state, e.g. a token-graph router's probs
        self.length = 0  # tokens written so far (padding included)

    def _alloc(self, like_BHTD: torch.Tensor, left_pad: torch.Tensor | None) -> None:
        B, _, T, D = like_BHTD.shape
        self.left_pad = check_left_pad(left_pad, B, T)  # T: the prompt, written first
        if self.left_pad is not None:
            self.left_pad = self.left_pad.to(like_BHTD.device)
        total = sum(self.caps)
        self.k = like_BHTD.new_zeros(B, total, D)
        self.v = like_BHTD.new_zeros(B, total, D)
        if self.order != sorted(self.order):
            order = torch.tensor(self.order, device=like_BHTD.device)
            self._perm = (order, torch.argsort(order))

    def _local(self, h: int, p):
        """Slot of position p (int or tensor) within head h: static below the sink, circular after."""
        s, w = self.sink[h], self.span[h]
        if self.caps[h] >= self.ref_len:  # a dense head: position == slot
            return p
        if isinstance(p, int):
            return p if p < s else s + (p - s) % w
        return torch.where(p < s, p, s + (p - s) % w)

    def write(self, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor, left_pad: torch.Tensor | None = None) -> None:
        """Store T new tokens (token indices length .. length+T-1). Only tokens some future query can
        still see are written, so no slot is written twice in one call. ``left_pad`` (B,) is read
        at the first write (the prompt) and holds for the cache's life."""
        if self.k is None:
            self._alloc(k_BHTD, left_pad)
        T = k_BHTD.shape[2]
        if self.length + T > self.ref_len:
            raise ValueError(f"ragged cache sized for {self.ref_len} tokens; got position {self.length + T - 1}")
        if self.left_pad is None and T == 1:  # decode: one slot per head, one indexed write for all heads
            slots = [self.offsets[h] + self._local(h, self.length) for h in range(len(self.caps))]
            idx = torch.tensor(slots, device=k_BHTD.device)
            self.k[:, idx], self.v[:, idx] = k_BHTD[:, :, 0], v_BHTD[:, :, 0]
            self.length += 1
            return
        t = torch.arange(self.length, self.length + T, device=k_BHTD.device)
        if self.left_pad is None:
            for h in range(len(self.caps)):
                for dst, src, n in self._runs(h, T):  # slice copies: no index tensors, no gathers
                    self.k[:, dst : dst + n] = k_BHTD[:, h, src : src + n]
                    self.v[:, dst : dst + n] = v_BHTD[:, h, src : src + n]
        else:
            p_BT = t[None, :] - self.left_pad[:, None]  # positions within each row; < 0 is padding
            for h in range(len(self.caps)):
                slots, keep_BT = self._slots(h, p_BT, t[None, :])
                rows, cols = keep_BT.nonzero(as_tuple=True)
                self.k[rows, slots], self.v[rows, slots] = k_BHTD[rows, h, cols], v_BHTD[rows, h, cols]
        self.length += T

    def _runs(self, h: int, T: int) -> list[tuple[int, int, int]]:
        """(buffer slot, index in the new tokens, count) runs that store tokens ``length .. length+T-1``
        of head h without padding: the ones below the sink, and the last ``span`` ones, which fill the
        circular window in at most two runs (before and after its wrap)."""
        first, last, base = self.length, self.length + T - 1, self.offsets[h]
        s, w = self.sink[h], self.span[h]
        if self.caps[h] >= self.ref_len:  # dense head: slot == position
            return [(base + first, 0, T)]
        runs = []
        if first < s:
            runs.append((base + first, 0, min(s, last + 1) - first))
        p0 = max(s, last - w + 1, first)  # first window position some later query still sees
        n = last + 1 - p0
        if n > 0:
            start = (p0 - s) % w
            m = min(n, w - start)
            runs.append((base + s + start, p0 - first, m))
            if n > m:
                runs.append((base + s, p0 - first + m, n - m))
        return runs

    def _slots(self, h: int, p: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffer slots of head h for the positions p (at token indices t) that some query from now
        on can still see, and the mask of those positions."""
        last = self.length + t.shape[-1] - 1
        keep = (p >= 0) & ((p < self.sink[h]) | (last - t < self.span[h]) | (self.caps[h] >= self.ref_len))
        return self.offsets[h] + self._local(h, p[keep]), keep

    def decode_view(self) -> tuple[list, tuple | None, torch.Tensor | None]:
        """What the newest query (position length-1) may see, for ``kernels.ragged``: per group of
        equal-capacity heads, in buffer order, the first ``n = min(length, cap)`` slots of each head
        as strided (B, heads, n, D) views of K and V; the (order, inverse) head permutation or None;
        and each row's own length (B,) under left padding, else None.

        No window mask is needed: positions below ``cap`` sit in slots equal to their position, and
        once the window has wrapped its ``span`` slots hold exactly the last ``span`` positions.
        """
        B, D = self.k.shape[0], self.k.shape[2]
        groups, start = [], 0
        for heads, cap in self.groups:
            n = min(self.length, cap)
            groups.append(tuple(x[:, start : start + heads * cap].view(B, heads, cap, D)[:, :, :n] for x in (self.k, self.v)))
            start += heads * cap
        row_len = None if self.left_pad is None else self.length - self.left_pad
        return groups, self._perm, row_len

    def kept(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per KV head, the cached keys a later query can still see, in position order: (positions
        (n,), k (B, n, D), v (B, n, D)): the sink, and the last ``span - 1`` positions (the newest
        query's window also covers itself). Read before the next write, which may reuse their slots."""
        if self.left_pad is not None:
            raise ValueError("chunked prefill with a ragged cache does not support left padding")
        L, dev, out = self.length, self.k.device, []
        for h in range(len(self.caps)):
            s, w = self.sink[h], self.span[h]
            if self.caps[h] >= self.ref_len:
                pos = torch.arange(L, device=dev)
            else:
                # the window part starts past the sink (or at L, empty, while the prompt is still inside it)
                pos = torch.cat([torch.arange(min(s, L), device=dev), torch.arange(max(min(s, L), L - w + 1), L, device=dev)])
            slots = self.offsets[h] + self._local(h, pos)
            out.append((pos, self.k[:, slots], self.v[:, slots]))
        return out

    def extend(self, name: str, x_BHTD: torch.Tensor) -> torch.Tensor:
        """Dense append-only state other than K/V (``KVCache.extend``): token-graph routers keep
        their past probabilities and keys here, whatever the attention plan."""
        return self._extra.extend(name, x_BHTD)

    def nbytes(self) -> int:
        """Bytes actually allocated: K and V, plus any state kept through ``extend``."""
        kv = 0 if self.k is None else self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()
        return kv + self._extra.nbytes()
