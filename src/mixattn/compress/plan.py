"""The sparse attention plan: one (sink, alpha, beta) rule per layer and per KV head.

Semantics (MoA, arXiv 2406.14909, per KV head): span(N) = min(N, max(1, floor(alpha + beta N))); query i sees key j when
j <= i and (j < sink or i - j < span(N)); a head's density at N is min(N, sink + span(N)) / N, the
share of its KV cache kept. N is the input length of a forward, or prompt + max_new_tokens when
generating. ``{"sink": 0, "alpha": 0, "beta": 1.0}`` is dense. Query heads sharing a KV head share
its rule: the cache saving lives at the KV-head level.

The plan is the only artifact passed from profiling to optimisation to application; it is JSON
(``"format": "mixattn-plan/1"``), saved atomically and validated against the model on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..kernels.sparse import span_at
from ..paths import read_json, save_figure, write_text

FORMAT = "mixattn-plan/1"


@dataclass(frozen=True)
class HeadRule:
    sink: int = 0
    alpha: float = 0.0
    beta: float = 1.0

    def span(self, N: int) -> int:
        return span_at(self.alpha, self.beta, N)

    def kept(self, N: int) -> int:
        """KV entries this head keeps at reference length N."""
        return min(N, self.sink + self.span(N))

    def density(self, N: int) -> float:
        return self.kept(N) / N

    def check(self, where: str) -> None:
        if not isinstance(self.sink, int) or isinstance(self.sink, bool) or self.sink < 0:
            raise ValueError(f"{where}: sink must be an integer >= 0, got {self.sink!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"{where}: alpha must be a finite number >= 0, got {self.alpha!r}")
        if not isinstance(self.beta, (int, float)) or not 0 <= self.beta <= 1:
            raise ValueError(f"{where}: beta must be in [0, 1], got {self.beta!r}")


DENSE = HeadRule(0, 0.0, 1.0)


def _check_lengths(lengths, where: str) -> None:
    """Reference lengths: a non-empty list of integers >= 1 (densities divide by them)."""
    ok = isinstance(lengths, (list, tuple)) and len(lengths) > 0
    ok = ok and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths)
    if not ok:
        raise ValueError(f"{where} must be a non-empty list of integers >= 1, got {lengths!r}")


@dataclass(frozen=True)
class Plan:
    layers: tuple[tuple[HeadRule, ...], ...]  # [layer][kv head]
    model_name: str = ""
    profile_lengths: tuple[int, ...] = (1024, 2048, 4096)
    meta: dict = field(default_factory=dict, compare=False)  # provenance: method, budget, objective...

    def __post_init__(self):
        _check_lengths(self.profile_lengths, "plan profile_lengths")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    def rules(self):
        return [r for layer in self.layers for r in layer]

    def density(self, lengths=None) -> float:
        """Mean density over (layer, KV head) pairs and ``lengths`` (default: the profile lengths)."""
        lengths = lengths or self.profile_lengths
        rules = self.rules()
        return sum(r.density(N) for N in lengths for r in rules) / (len(rules) * len(lengths))

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model": {"name": self.model_name, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads},
            "density": round(self.density(), 6),
            "profile_lengths": list(self.profile_lengths),
            "layers": [{"heads": [{"sink": r.sink, "alpha": r.alpha, "beta": r.beta} for r in layer]}
                       for layer in self.layers],
            "meta": self.meta,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a plan must be a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"{source}: unknown plan format {data.get('format')!r}; expected {FORMAT!r}")
        try:
            layers = []
            for i, layer in enumerate(data["layers"]):
                heads = []
                for h, r in enumerate(layer["heads"]):
                    extra = set(r) - {"sink", "alpha", "beta"}
                    if extra:
                        raise ValueError(f"{source}: layer {i} head {h}: unknown key {sorted(extra)[0]!r}")
                    rule = HeadRule(r["sink"], r["alpha"], r["beta"])
                    rule.check(f"{source}: layer {i} head {h}")
                    heads.append(rule)
                layers.append(tuple(heads))
            model = data.get("model", {})
            lengths = data.get("profile_lengths", [1024, 2048, 4096])
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: malformed plan ({type(e).__name__}: {e})") from None
        if not isinstance(model, dict) or not isinstance(model.get("name", ""), str):
            raise ValueError(f"{source}: 'model' must be an object whose 'name' is a string, got {model!r}")
        _check_lengths(lengths, f"{source}: profile_lengths")
        if not isinstance(data.get("meta", {}), dict):
            raise ValueError(f"{source}: 'meta' must be an object")
        if not layers or len({len(layer) for layer in layers}) != 1 or not layers[0]:
            raise ValueError(f"{source}: every layer must list the same, non-zero number of KV heads")
        for key, want in (("num_layers", len(layers)), ("num_kv_heads", len(layers[0]))):
            if key in model and model[key] != want:
                raise ValueError(f"{source}: model.{key}={model[key]} but the plan lists {want}")
        return cls(tuple(layers), model.get("name", ""), tuple(lengths), data.get("meta", {}))

    def digest(self) -> str:
        """16 hex chars of SHA-256 over the rules only (what changes a model's outputs; not the meta)."""
        rules = [[(r.sink, r.alpha, r.beta) for r in layer] for layer in self.layers]
        return hashlib.sha256(json.dumps(rules).encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + rename): a failed save never leaves half a plan."""
        return write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        return cls.from_dict(read_json(path, missing="no such plan"), str(path))

    def validate(self, cfg) -> None:
        """Check the plan fits a model config (``MixtureConfig``): layers and KV heads must match."""
        if (self.num_layers, self.num_kv_heads) != (cfg.num_layers, cfg.num_kv_heads):
            name = f" {self.model_name!r}" if self.model_name else ""
            raise ValueError(
                f"plan{name} is for {self.num_layers} layers x {self.num_kv_heads} KV heads; "
                f"the model has {cfg.num_layers} x {cfg.num_kv_heads}"
            )

    # ------------------------------------------------------------------ baselines

    @classmethod
    def dense(cls, num_layers: int, num_kv_heads: int, **kw) -> Plan:
        return cls(tuple((DENSE,) * num_kv_heads for _ in range(num_layers)), **kw)

    @classmethod
    def uniform(cls, num_layers, num_kv_heads, density: float, length: int, sink: int = 64, **kw) -> Plan:
        """StreamingLLM: the same sink + window for every head, elastic (beta) so the density holds at
        every length, as MoA's StreamingLLM baseline (alpha 0, beta = density - sink / length)."""
        rule = _rule_for_density(density, length, sink)
        return cls(tuple((rule,) * num_kv_heads for _ in range(num_layers)), meta={"method": "uniform"}, **kw)

    @classmethod
    def duo(cls, scores, density: float, length: int, sink: int = 64, window: int = 256, **kw) -> Plan:
        """DuoAttention-style: the highest-scoring heads are full "retrieval" heads, the rest
        "streaming" heads (sink + a fixed recent window); as many retrieval heads as the density allows.

        Args: scores: [layer][kv head] retrieval scores (higher = needs more context).
        """
        flat = [(s, i, h) for i, layer in enumerate(scores) for h, s in enumerate(layer)]
        stream = HeadRule(sink, float(window), 0.0)
        d_s = stream.density(length)
        n = len(flat)
        r = 0 if density <= d_s else min(n, round(n * (density - d_s) / (1 - d_s)))
        retrieval = {(i, h) for _, i, h in sorted(flat, reverse=True)[:r]}
        layers = tuple(tuple(DENSE if (i, h) in retrieval else stream for h in range(len(layer)))
                       for i, layer in enumerate(scores))  # fmt: skip
        return cls(layers, meta={"method": "duo", "retrieval_heads": r}, **kw)

    @classmethod
    def layerwise(cls, densities, num_kv_heads: int, length: int, sink: int = 64, **kw) -> Plan:
        """Per-layer heterogeneous uniform: every head of layer i gets the rule for ``densities[i]``."""
        layers = tuple((_rule_for_density(d, length, sink),) * num_kv_heads for d in densities)
        return cls(layers, meta={"method": "layerwise"}, **kw)

    # ------------------------------------------------------------------ reporting

    def summary(self, lengths=None) -> str:
        lengths = lengths or self.profile_lengths
        counts = Counter(self.rules())
        lines = [
            f"plan for {self.model_name or 'a model'}: {self.num_layers} layers x {self.num_kv_heads} KV heads",
            "density: " + ", ".join(f"{self.density([N]):.3f} @ {N}" for N in lengths)
            + f" (mean {self.density(lengths):.3f})",
            f"{len(counts)} distinct rules (sink, alpha, beta -> span / density @ {lengths[-1]}):",
        ]
        for rule, n in counts.most_common():
            N = lengths[-1]
            lines.append(f"  {n:4d} heads  sink {rule.sink:5d}  alpha {rule.alpha:8.1f}  beta {rule.beta:.3f}"
                         f"  -> span {rule.span(N):6d}  density {rule.density(N):.3f}")  # fmt: skip
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike, length: int | None = None) -> Path:
        """Heatmaps of span and density at ``length`` (default: the longest profile length), layer x KV head."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        N = length or self.profile_lengths[-1]
        span = np.array([[r.span(N) for r in layer] for layer in self.layers], dtype=float)
        dens = np.array([[r.density(N) for r in layer] for layer in self.layers])
        fig, axes = plt.subplots(1, 2, figsize=(3 + 1.2 * self.num_kv_heads, 1.5 + 0.22 * self.num_layers))
        for ax, data, title, cmap in ((axes[0], span, f"span @ N={N}", "viridis"),
                                      (axes[1], dens, f"density @ N={N}", "magma")):  # fmt: skip
            im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0, vmax=N if data is span else 1)
            ax.set(title=title, xlabel="KV head", ylabel="layer", xticks=range(self.num_kv_heads))
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"{self.model_name or 'plan'}: mean density {self.density([N]):.3f} @ {N}")
        fig.tight_layout()
        try:
            return save_figure(fig, path, dpi=110)
        finally:
            plt.close(fig)


def _rule_for_density(density: float, length: int, sink: int) -> HeadRule:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if density >= 1:
        return DENSE
    sink = min(sink, max(0, int(density * length) - 1))
    beta = max(0.0, density - sink / length)
    return HeadRule(sink, 0.0, round(beta, 6))
