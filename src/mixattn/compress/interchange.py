"""Plan interchange with the files that MoA and DuoAttention publish.

**MoA** (Fu et al., "Mixture of Sparse Attention", arXiv 2406.14909) ships ``moa_alpha_beta.json``:
``{"alphas": [[...]], "betas": [[...]]}`` indexed [layer][query head], with the sink ("global" size)
64 and the block 64 fixed. A head sees a key when j < 64 or i - j < alpha + beta N: exactly a mixattn
``HeadRule(64, alpha, beta)``. MoA's kernels round the band to 64-token blocks; mixattn applies the
rule per token, so a span can differ from MoA's by less than one block. MoA expands GQA to MHA, so it
has a rule per *query* head; mixattn keeps one per KV head (the cache saving lives there), so a GQA
model's G query heads (query head h reads KV head h // G, transformers' ``repeat_kv`` order) are
reduced to one rule:

- ``gqa="max"`` (default): the largest alpha and the largest beta of the group. span(N) grows with
  both, so every query head still sees at least the keys MoA gave it, at every N; the density can
  only go up.
- ``gqa="mean"``: the mean alpha and beta, which keeps the group's mean density (to within the floor).

**DuoAttention** (Xiao et al., arXiv 2410.10819) ships ``full_attention_heads.tsv`` (one row per layer,
one column per KV head, gates in [0, 1]) with a ``config.json`` holding ``sink_size`` and
``recent_size``. As DuoAttention's own sparsify step, a sparsity S makes the heads whose gate is below
the S-quantile of all gates "streaming" heads, ``HeadRule(sink_size, recent_size, 0)`` (StreamingLLM,
arXiv 2309.17453), and keeps the rest full (S <= 0: every head full; S >= 1: none).

Export writes the same formats back; a plan that a format cannot hold exactly (MoA: a sink other
than 64; Duo: elastic or unequal windows) raises ValueError naming the first head that does not fit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..paths import read_json, write_text
from .plan import DENSE, HeadRule, Plan

MOA_SINK = 64  # MoA's fixed global (sink) size and block size, in tokens
MOA_BLOCK = 64
GQA_REDUCTIONS = ("max", "mean")
DUO_DEFAULTS = {"sink_size": 64, "recent_size": 256}  # written when a plan has no streaming head


def _rule(sink: int, alpha: float, beta: float) -> HeadRule:
    """A rule whose window always covers N (beta >= 1) is dense: store the canonical dense entry."""
    return DENSE if beta >= 1 else HeadRule(sink, alpha, beta)


def _matrix(data, key: str, source: str, rows: int | None, lo: float, hi: float) -> list[list[float]]:
    """A [layer][head] list of finite numbers in [lo, hi] (rows: the expected number of layers)."""
    m = data.get(key) if isinstance(data, dict) else None
    if not isinstance(m, list) or not m or not all(isinstance(r, list) and r for r in m):
        raise ValueError(f"{source}: {key!r} must be a non-empty list of per-layer lists")
    if rows is not None and len(m) != rows:
        raise ValueError(f"{source}: {key!r} lists {len(m)} layers; the model has {rows}")
    for i, row in enumerate(m):
        for h, x in enumerate(row):
            ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi
            if not ok:
                raise ValueError(f"{source}: {key}[{i}][{h}] must be a number in [{lo}, {hi}], got {x!r}")
    return m


# ---------------------------------------------------------------------------------------------- MoA


def moa_to_plan(data: dict, num_layers: int, num_heads: int, num_kv_heads: int, gqa: str = "max",
                source: str = "MoA plan", **plan_kw) -> Plan:  # fmt: skip
    """MoA's {"alphas", "betas"} [layer][query head] -> a Plan [layer][KV head] (see the module doc).
    Lists with one entry per KV head are taken as they are."""
    if gqa not in GQA_REDUCTIONS:
        raise ValueError(f"gqa={gqa!r}: expected one of {GQA_REDUCTIONS}")
    alphas = _matrix(data, "alphas", source, num_layers, 0.0, math.inf)
    betas = _matrix(data, "betas", source, num_layers, 0.0, 1.0)
    layers = []
    for i, (a_row, b_row) in enumerate(zip(alphas, betas)):
        if len(a_row) != len(b_row):
            raise ValueError(f"{source}: layer {i} has {len(a_row)} alphas but {len(b_row)} betas")
        if len(a_row) not in (num_heads, num_kv_heads):
            raise ValueError(f"{source}: layer {i} lists {len(a_row)} heads; the model has {num_heads} query "
                             f"heads ({num_kv_heads} KV heads)")  # fmt: skip
        G = len(a_row) // num_kv_heads
        rules = []
        for k in range(num_kv_heads):
            a, b = a_row[k * G : (k + 1) * G], b_row[k * G : (k + 1) * G]
            if gqa == "max":
                alpha, beta = max(a), max(b)
            else:  # equal values stay exact (a round trip through export repeats each rule G times)
                alpha = a[0] if len(set(a)) == 1 else round(sum(a) / G, 6)
                beta = b[0] if len(set(b)) == 1 else round(sum(b) / G, 6)
            rules.append(_rule(MOA_SINK, float(alpha), float(beta)))
        layers.append(tuple(rules))
    G = num_heads // num_kv_heads
    note = (f"MoA rules per query head ({num_heads}) reduced to one per KV head ({num_kv_heads}) by the {gqa} "
            f"alpha and beta of each group of {G} query heads (query head h -> KV head h // {G})"
            if len(alphas[0]) == num_heads and G > 1 else "one MoA rule per KV head")  # fmt: skip
    meta = {"method": "moa-import", "source": source, "sink": MOA_SINK, "block": MOA_BLOCK, "gqa": gqa, "note": note}
    return Plan(tuple(layers), meta=meta, **plan_kw)


def load_moa(path: str | os.PathLike, num_layers: int, num_heads: int, num_kv_heads: int, gqa: str = "max",
             **plan_kw) -> Plan:  # fmt: skip
    return moa_to_plan(read_json(path, missing="no such MoA plan"), num_layers, num_heads, num_kv_heads, gqa,
                       str(path), **plan_kw)  # fmt: skip


def plan_to_moa(plan: Plan, num_heads: int) -> dict:
    """A Plan -> MoA's {"alphas", "betas"} per query head (each KV head's rule repeated for its G query heads)."""
    if num_heads % plan.num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of the plan's {plan.num_kv_heads} KV heads")
    G = num_heads // plan.num_kv_heads
    alphas, betas = [], []
    for i, layer in enumerate(plan.layers):
        for h, r in enumerate(layer):
            if r.beta < 1 and r.sink != MOA_SINK:
                raise ValueError(f"layer {i} KV head {h}: sink {r.sink}, but MoA's format fixes the sink at "
                                 f"{MOA_SINK} (only dense heads, beta 1, may differ)")  # fmt: skip
        alphas.append([float(r.alpha) if r.beta < 1 else 0.0 for r in layer for _ in range(G)])
        betas.append([float(min(r.beta, 1.0)) for r in layer for _ in range(G)])
    return {"alphas": alphas, "betas": betas}


def save_moa(plan: Plan, path: str | os.PathLike, num_heads: int) -> Path:
    data = plan_to_moa(plan, num_heads)
    return write_text(path, json.dumps(data, indent=1))


# ---------------------------------------------------------------------------------------------- Duo


def read_duo_gates(path: str | os.PathLike) -> list[list[float]]:
    """``full_attention_heads.tsv``: one row per layer, one gate in [0, 1] per KV head."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such DuoAttention gate file: {p}")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append([float(x) for x in line.split()])
        except ValueError:
            raise ValueError(f"{p}: line {n} is not tab-separated numbers: {line[:60]!r}") from None
    gates = _matrix({"gates": rows}, "gates", str(p), None, 0.0, 1.0)
    if len({len(r) for r in gates}) != 1:
        raise ValueError(f"{p}: every line must list the same number of KV heads")
    return gates


def read_duo_config(path: str | os.PathLike) -> tuple[int, int]:
    """(sink_size, recent_size) from DuoAttention's config.json."""
    data = read_json(path, missing="no such DuoAttention config")
    out = []
    for key, low in (("sink_size", 0), ("recent_size", 1)):
        v = data.get(key) if isinstance(data, dict) else None
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{path}: {key!r} must be an integer >= {low}, got {v!r}")
        out.append(v)
    return out[0], out[1]


def duo_full_heads(gates: list[list[float]], sparsity: float) -> list[list[bool]]:
    """DuoAttention's sparsify: heads with gate >= the ``sparsity``-quantile of all gates stay full."""
    if not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"sparsity must be a number, got {sparsity!r}")
    flat = sorted(g for row in gates for g in row)
    if sparsity >= 1:
        threshold = 2.0
    elif sparsity <= 0:
        threshold = -1.0
    else:  # linear interpolation between order statistics, as numpy.quantile's default
        pos = sparsity * (len(flat) - 1)
        lo = math.floor(pos)
        threshold = flat[lo] + (flat[min(lo + 1, len(flat) - 1)] - flat[lo]) * (pos - lo)
    return [[g >= threshold for g in row] for row in gates]


def duo_to_plan(gates, sink: int, recent: int, sparsity: float, num_layers: int | None = None,
                num_kv_heads: int | None = None, source: str = "DuoAttention plan", **plan_kw) -> Plan:  # fmt: skip
    if num_layers is not None and (len(gates), len(gates[0])) != (num_layers, num_kv_heads):
        raise ValueError(f"{source}: {len(gates)} layers x {len(gates[0])} KV heads; the model has "
                         f"{num_layers} x {num_kv_heads}")  # fmt: skip
    stream = HeadRule(sink, float(recent), 0.0)
    full = duo_full_heads(gates, sparsity)
    layers = tuple(tuple(DENSE if f else stream for f in row) for row in full)
    n_full = sum(map(sum, full))
    meta = {"method": "duo-import", "source": source, "sparsity": sparsity, "sink_size": sink,
            "recent_size": recent, "retrieval_heads": n_full,
            "note": f"{n_full} of {len(gates) * len(gates[0])} KV heads full (gate >= the {sparsity} quantile); "
                    f"the rest sink {sink} + recent {recent}"}  # fmt: skip
    return Plan(layers, meta=meta, **plan_kw)


def load_duo(tsv: str | os.PathLike, config: str | os.PathLike, sparsity: float, num_layers: int | None = None,
             num_kv_heads: int | None = None, **plan_kw) -> Plan:  # fmt: skip
    sink, recent = read_duo_config(config)
    return duo_to_plan(read_duo_gates(tsv), sink, recent, sparsity, num_layers, num_kv_heads, str(tsv), **plan_kw)


def plan_to_duo(plan: Plan) -> tuple[list[list[float]], dict]:
    """A Plan -> (gates [layer][KV head]: 1 full, 0 streaming; {"sink_size", "recent_size"}). Every
    non-dense head must share one fixed (beta 0) sink + window rule."""
    stream = None
    for i, layer in enumerate(plan.layers):
        for h, r in enumerate(layer):
            if r.beta >= 1:
                continue
            if r.beta != 0 or r.alpha != int(r.alpha) or r.alpha < 1:
                raise ValueError(f"layer {i} KV head {h}: window alpha {r.alpha} + beta {r.beta} N; DuoAttention's "
                                 "format holds full heads and one fixed sink + recent window (beta 0)")  # fmt: skip
            if stream is not None and (r.sink, r.alpha) != stream:
                raise ValueError(f"layer {i} KV head {h}: sink {r.sink} + window {int(r.alpha)} differs from the "
                                 f"first streaming head's {stream[0]} + {int(stream[1])}; DuoAttention has one")  # fmt: skip
            stream = (r.sink, r.alpha)
    gates = [[1.0 if r.beta >= 1 else 0.0 for r in layer] for layer in plan.layers]
    config = dict(DUO_DEFAULTS) if stream is None else {"sink_size": stream[0], "recent_size": int(stream[1])}
    return gates, config


def save_duo(plan: Plan, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``full_attention_heads.tsv`` and ``config.json`` into ``directory``; returns their paths."""
    gates, config = plan_to_duo(plan)
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"--out {d} is a file; DuoAttention's export is a folder")
    d.mkdir(parents=True, exist_ok=True)
    tsv = "".join("\t".join(f"{g:g}" for g in row) + "\n" for row in gates)
    a = write_text(d / "full_attention_heads.tsv", tsv)
    b = write_text(d / "config.json", json.dumps(config, indent=1))
    return a, b
