"""``MixtureConfig``: one frozen dataclass describing a Llama-style decoder whose layers each pick
an attention (dense, MoH, MoA, BAM, RCMHA) and an FFN (dense, MoE), plus named ``PRESETS``.

Configs round-trip through JSON (``to_dict`` / ``from_dict``); unknown keys and bad values raise
``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, replace

from .. import kernels
from ..layers.attention import AttentionConfig
from ..layers.moa import MoAConfig
from ..layers.moe import MoEConfig
from ..layers.moh import MoHConfig
from ..layers.rcmha import RCMHAConfig
from ..layers.routers import RouterConfig

ATTENTIONS = ("dense", "moh", "moa", "bam", "bam_kv", "rcmha")
FFNS = ("dense", "moe")
BLOCKS = ("sequential", "parallel")
BALANCES = ("switch", "sequence", "global", "none")


@dataclass(frozen=True, kw_only=True)
class HeadsConfig:
    """Attention geometry shared by every attention kind."""

    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    qk_norm: str = "none"  # "none" | "rms": per-head RMSNorm on q and k (OLMo-2, Qwen3)
    bias: bool = False  # q/k/v biases (Qwen2, Llama attention_bias)
    out_bias: bool = False  # output-projection bias (Llama attention_bias)


@dataclass(frozen=True, kw_only=True)
class RopeConfig:
    theta: float = 10000.0
    scaling: dict | None = None  # HF layout, e.g. {"rope_type": "llama3", "factor": 8.0, ...}


@dataclass(frozen=True, kw_only=True)
class LayersConfig:
    """Which attention and FFN each layer has, and the settings of each mixture kind."""

    attention: str | tuple[str, ...] = "dense"  # one kind for all layers, or one per layer
    ffn: str | tuple[str, ...] = "dense"  # "dense" | "moe", or one per layer
    block: str = "sequential"  # "parallel": x + attn(n(x)) + ffn(n(x)) (GPT-J / PaLM / BAM)
    moh: MoHConfig = field(default_factory=lambda: MoHConfig(shared_heads=2, top_k=1))
    moa: MoAConfig = field(default_factory=MoAConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    rcmha: RCMHAConfig = field(default_factory=RCMHAConfig)  # conv + relative positions (ablations: MDHA, RMHA)
    bam_experts: int = 2  # soft attention experts per BAM layer


@dataclass(frozen=True, kw_only=True)
class BalanceConfig:
    loss: str = "switch"  # switch | sequence | global (buffered over accumulation) | none
    coef: float = 0.01  # JetMoE / MoH beta
    z_coef: float = 0.001  # ST-MoE z-loss


# The flat field names of the first config layout, and where each lives now. Old config.json files,
# ``--set`` overrides and ``evolve`` take them; reading ``cfg.num_heads`` etc. works through aliases.
FLAT = {
    "num_heads": "heads.num_heads", "num_kv_heads": "heads.num_kv_heads", "head_dim": "heads.head_dim",
    "qk_norm": "heads.qk_norm", "attention_bias": "heads.bias", "attention_out_bias": "heads.out_bias",
    "rope_theta": "rope.theta", "rope_scaling": "rope.scaling",
    "attention": "layers.attention", "ffn": "layers.ffn", "block": "layers.block", "moh": "layers.moh",
    "moa": "layers.moa", "moe": "layers.moe", "rcmha": "layers.rcmha", "bam_experts": "layers.bam_experts",
    "balance": "balancing.loss", "balance_coef": "balancing.coef", "z_coef": "balancing.z_coef",
}  # fmt: skip
# per-kind kernel choices of earlier layouts (``impl`` in a layer kind's config), now in
# MixtureConfig.kernels: moh and rcmha until the grouped layout, moe and moa until one release later
_OLD_IMPL = {"moh": "head_sparse_attention", "rcmha": "relative_attention",
             "moe": "grouped_linear", "moa": "grouped_linear"}  # fmt: skip


class _Alias:
    """Read-only attribute for a flat name: ``cfg.num_heads`` is ``cfg.heads.num_heads``."""

    def __set_name__(self, owner, name):
        self.path = FLAT[name].split(".")

    def __get__(self, obj, owner=None):
        return self if obj is None else getattr(getattr(obj, self.path[0]), self.path[1])


@dataclass(frozen=True, kw_only=True)
class MixtureConfig:
    vocab_size: int = 256  # byte-level tokenizer by default
    hidden_dim: int = 256
    num_layers: int = 4
    ffn_dim: int = 683  # dense SwiGLU width (Llama's 8/3 x hidden)
    max_seq_len: int = 2048  # longest position the model is meant for (RoPE has no hard limit)
    norm_eps: float = 1e-5
    final_norm_eps: float | None = None  # eps of the last norm if it differs (HF JetMoe: blocks fixed at 1e-6)
    tie_embeddings: bool = True
    init_std: float = 0.02  # embedding init
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    rope: RopeConfig = field(default_factory=RopeConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    balancing: BalanceConfig = field(default_factory=BalanceConfig)
    kernels: dict[str, str] = field(default_factory=dict)  # {kernel op: implementation}; others "auto"

    # flat read aliases (see FLAT): cfg.num_heads is cfg.heads.num_heads, cfg.moe is cfg.layers.moe, ...
    num_heads, num_kv_heads, head_dim, qk_norm = _Alias(), _Alias(), _Alias(), _Alias()
    attention_bias, attention_out_bias, rope_theta, rope_scaling = _Alias(), _Alias(), _Alias(), _Alias()
    attention, ffn, block, bam_experts = _Alias(), _Alias(), _Alias(), _Alias()
    moh, moa, moe, rcmha = _Alias(), _Alias(), _Alias(), _Alias()
    balance, balance_coef, z_coef = _Alias(), _Alias(), _Alias()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"config {name} must be >= 1, got {getattr(self, name)}")
        for name, valid in (("attention", ATTENTIONS), ("ffn", FFNS)):
            value = getattr(self, name)
            kinds = (value,) if isinstance(value, str) else tuple(value)
            if not isinstance(value, str) and len(kinds) != self.num_layers:
                raise ValueError(f"config {name} lists {len(kinds)} layers but num_layers={self.num_layers}")
            bad = [k for k in kinds if k not in valid]
            if bad:
                raise ValueError(f"config {name}={bad[0]!r} is not one of {valid}")
        if self.block not in BLOCKS:
            raise ValueError(f"config block={self.block!r} is not one of {BLOCKS}")
        if self.balance not in BALANCES:
            raise ValueError(f"config balance={self.balance!r} is not one of {BALANCES}")
        if not isinstance(self.kernels, dict):
            raise ValueError(f"config kernels must map kernel op to implementation, got {self.kernels!r}")
        for op, impl in self.kernels.items():
            kernels.get(op, impl)  # names the valid ops or implementations
        self.attention_config()  # validates the head geometry

    def attention_at(self, layer: int) -> str:
        return self.attention if isinstance(self.attention, str) else self.attention[layer]

    def ffn_at(self, layer: int) -> str:
        return self.ffn if isinstance(self.ffn, str) else self.ffn[layer]

    def attention_config(self) -> AttentionConfig:
        h = self.heads
        return AttentionConfig(hidden_dim=self.hidden_dim, num_heads=h.num_heads, num_kv_heads=h.num_kv_heads,
                               head_dim=h.head_dim, qk_norm=h.qk_norm, bias=h.bias, out_bias=h.out_bias,
                               norm_eps=self.norm_eps)  # fmt: skip

    def evolve(self, **changes) -> MixtureConfig:
        """``dataclasses.replace`` that also takes the flat names: ``cfg.evolve(num_kv_heads=2, moe=...)``."""
        top, groups = {}, {}
        for key, value in changes.items():
            if key in FLAT:
                group, name = FLAT[key].split(".")
                groups.setdefault(group, {})[name] = value
            else:
                top[key] = value
        for group, kw in groups.items():
            top[group] = replace(top.get(group, getattr(self, group)), **kw)
        return replace(self, **top)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MixtureConfig:
        """From JSON, in the current layout or the first, flat one (old checkpoints)."""
        return _build(cls, migrate(data), "config")


def migrate(data: dict) -> dict:
    """A config dict in the current layout. Flat keys (the first layout) move into their groups,
    and a layer kind's own kernel field (``moh.impl``, ``rcmha.impl``, ``moe.impl``, ``moa.impl``)
    moves into ``kernels``, where an explicit entry wins."""
    if not isinstance(data, dict):
        return data
    out = {k: v for k, v in data.items() if k not in FLAT}
    for key, value in data.items():
        if key in FLAT:
            group, name = FLAT[key].split(".")
            here = out.get(group)
            out[group] = {**(here if isinstance(here, dict) else {}), name: value}
    if not isinstance(out.get("layers"), dict):
        return out
    layers, old = dict(out["layers"]), {}
    for kind, op in _OLD_IMPL.items():
        if isinstance(layers.get(kind), dict) and "impl" in layers[kind]:
            impl = layers[kind]["impl"]
            layers[kind] = {k: v for k, v in layers[kind].items() if k != "impl"}
            if impl != "auto" and old.setdefault(op, impl) != impl:
                raise ValueError(f"config: moe.impl and moa.impl name different {op} kernels "
                                 f"({old[op]!r}, {impl!r}); a model now has one: set config kernels.{op}")  # fmt: skip
    out["layers"] = layers
    if old and isinstance(out.get("kernels", {}), dict):  # a malformed kernels entry is left to validation
        out["kernels"] = {**old, **out.get("kernels", {})}
    return out


def _build(cls, data: dict, where: str):
    """Rebuild a (nested) frozen dataclass from JSON data, naming any unknown key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key {where}.{unknown[0]} (valid: {sorted(names)})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if typing.get_origin(hint) in (typing.Union, types.UnionType):  # "X | None": rebuild as X
            hint = next((h for h in typing.get_args(hint) if dataclasses.is_dataclass(h)), hint)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def _router(E: int, k: int, **kw) -> RouterConfig:
    return RouterConfig(num_experts=E, top_k=k, **kw)


_TINY = MixtureConfig().evolve(
    hidden_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=256,
    moh=MoHConfig(shared_heads=1, top_k=1),
    moa=MoAConfig(router=_router(4, 2, gate_norm="softmax_topk")),
    moe=MoEConfig(router=_router(4, 2, gate_norm="renorm"), expert_ffn_dim=64),
)  # fmt: skip
# small: ~11M parameters dense; 8 heads of 48 so MoH can run 50% (2 shared + 2 of 6) and 75% (4 + 2 of 4)
_SMALL = MixtureConfig().evolve(
    hidden_dim=384, num_layers=6, num_heads=8, num_kv_heads=8, head_dim=48, ffn_dim=1024, max_seq_len=512,
    moh=MoHConfig(shared_heads=2, top_k=2),
    # 4 KV heads x top-2 experts = 8 active query heads, like the dense model
    moa=MoAConfig(router=_router(8, 2, gate_norm="softmax_topk")),
    # 8 experts of half the dense width, top-2: the same active FFN compute as dense
    moe=MoEConfig(router=_router(8, 2, gate_norm="renorm"), expert_ffn_dim=512),
)  # fmt: skip


def _variants(base: MixtureConfig, prefix: str) -> dict[str, MixtureConfig]:
    H = base.num_heads
    return {
        prefix: base,
        f"{prefix}-moh": base.evolve(attention="moh"),
        f"{prefix}-moh75": base.evolve(attention="moh", moh=MoHConfig(shared_heads=H // 2, top_k=H // 4)),
        f"{prefix}-moa": base.evolve(attention="moa", num_kv_heads=H // 2),
        f"{prefix}-moe": base.evolve(ffn="moe"),
        f"{prefix}-moa-moe": base.evolve(attention="moa", num_kv_heads=H // 2, ffn="moe"),
        f"{prefix}-bam": base.evolve(attention="bam", ffn="moe", block="parallel",
                                 moe=replace(base.moe, router=_router(base.moe.num_experts, 1))),
    }  # fmt: skip


PRESETS: dict[str, MixtureConfig] = {**_variants(_TINY, "tiny"), **_variants(_SMALL, "small")}


def _rcmha_variants(base: MixtureConfig, prefix: str) -> dict[str, MixtureConfig]:
    """RCMHA and its two ablations: MDHA (convolution, RoPE kept) and RMHA (relative positions only)."""
    return {
        f"{prefix}-rcmha": base.evolve(attention="rcmha", rcmha=RCMHAConfig()),
        f"{prefix}-mdha": base.evolve(attention="rcmha", rcmha=RCMHAConfig(position="rope")),
        f"{prefix}-rmha": base.evolve(attention="rcmha", rcmha=RCMHAConfig(conv_kernel=0)),
    }


PRESETS.update({**_rcmha_variants(_TINY, "tiny"), **_rcmha_variants(_SMALL, "small")})


def from_name(name: str) -> MixtureConfig:
    """A preset by name; unknown names list the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_overrides(cfg: MixtureConfig, assignments: list[str]) -> MixtureConfig:
    """Apply ``key=value`` strings with dotted keys (``moe.router.graph=similarity``); values are
    parsed as JSON when they can be (numbers, lists, true/false), else taken as strings."""
    import json

    data = cfg.to_dict()
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        head, _, rest = key.partition(".")
        path = FLAT[head] + ("." + rest if rest else "") if head in FLAT else key  # the first layout's names
        node, parts = data, path.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"override {key!r}: {p!r} is not a config section")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"override {key!r}: unknown key {parts[-1]!r}")
        _check_kind(item, node[parts[-1]], value)
        node[parts[-1]] = value
    try:
        return MixtureConfig.from_dict(data)
    except (TypeError, KeyError) as e:
        raise ValueError(f"overrides {', '.join(assignments)}: invalid config ({type(e).__name__}: {e})") from None


def _check_kind(item: str, old, new) -> None:
    """An override keeps the field's kind: an integer field takes an integer, a number a number, ..."""
    kinds = ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "a list"))
    for kind, words in kinds:
        if isinstance(old, kind):
            ok = isinstance(new, kind) and not (kind is int and isinstance(new, bool))
            if kind is float:
                ok = isinstance(new, (int, float)) and not isinstance(new, bool)
            if not ok:
                raise ValueError(f"override {item!r}: expected {words}, got {new!r}")
            return
