"""HF JetMoe checkpoints (MoA attention experts + MoE FFN) in and out of ``MixtureLM``.

Semantics reproduced exactly (transformers ``modeling_jetmoe``; JetMoE, arXiv 2404.07413): top-k on router logits,
gates = softmax over the k selected logits (``gate_norm="softmax_topk"``), K-first ``kv_proj``,
tiled KV heads, output biases, and HF's norm quirk (block norms always use eps 1e-6; only the final
norm uses ``rms_norm_eps``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...layers.moa import MoAConfig
from ...layers.moe import MoEConfig
from ...layers.routers import RouterConfig
from ...paths import atomic_dir
from ..config import MixtureConfig
from ..decoder import MixtureLM
from . import keymaps
from .llama import from_hf_tensors, read_hf_config, read_safetensors, rope_settings

BLOCK_NORM_EPS = 1e-6  # JetMoeRMSNorm's default, used by every block norm whatever the config says


def config_from_jetmoe(hf: dict, source: str) -> MixtureConfig:
    if hf.get("activation_function", "silu") != "silu":
        raise ValueError(f"{source}: only activation_function='silu' is supported")
    try:
        E = hf.get("num_local_experts", hf.get("moe_num_experts"))  # HF names, then the original repo's
        k = hf.get("num_experts_per_tok", hf.get("moe_top_k"))
        Hkv = hf["num_key_value_heads"]
        theta, scaling = rope_settings(hf)
        router = RouterConfig(num_experts=E, top_k=k, gate_norm="softmax_topk")
        return MixtureConfig().evolve(
            vocab_size=hf["vocab_size"], hidden_dim=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=Hkv * k, num_kv_heads=Hkv, head_dim=hf.get("kv_channels") or hf["head_dim"],
            ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 4096),
            rope_theta=theta, rope_scaling=scaling, norm_eps=BLOCK_NORM_EPS,
            final_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            attention="moa", ffn="moe",
            moa=MoAConfig(router=router, bias=True), moe=MoEConfig(router=router, bias=True),
        )  # fmt: skip
    except (KeyError, TypeError) as e:
        raise ValueError(f"{source}: config.json lacks a JetMoe field ({e})") from None


def load_jetmoe(directory: str | Path) -> MixtureLM:
    directory = Path(directory)
    cfg = config_from_jetmoe(read_hf_config(directory), str(directory))
    return from_hf_tensors(cfg, read_safetensors(directory), str(directory), keymaps.JETMOE)


def _check_exportable(cfg: MixtureConfig) -> RouterConfig:
    L = range(cfg.num_layers)
    if {cfg.attention_at(i) for i in L} != {"moa"} or {cfg.ffn_at(i) for i in L} != {"moe"}:
        raise ValueError("jetmoe export needs MoA attention and MoE FFN in every layer")
    r_att, r_ffn = cfg.moa.router, cfg.moe.router
    for r in (r_att, r_ffn):
        if (r.scoring, r.select_on, r.gate_norm, r.gate, r.graph, r.bias_rate) != (
            "softmax", "logits", "softmax_topk", "soft", "none", 0.0
        ):
            raise ValueError(f"jetmoe export needs JetMoE routers (softmax, top-k on logits, softmax_topk); got {r}")
    if (r_att.num_experts, r_att.top_k) != (r_ffn.num_experts, r_ffn.top_k):
        raise ValueError("jetmoe export needs the same experts and top-k in attention and FFN (one config field)")
    if cfg.norm_eps != BLOCK_NORM_EPS:
        raise ValueError(f"HF JetMoe block norms use eps {BLOCK_NORM_EPS}; this model uses {cfg.norm_eps}")
    if cfg.qk_norm != "none" or cfg.attention_bias or cfg.block != "sequential" or cfg.moe.shared_experts:
        raise ValueError("jetmoe export supports no qk_norm, attention bias, parallel block or shared experts")
    return r_att


def export_jetmoe(model: MixtureLM, directory: str | Path) -> Path:
    """Write an MoA+MoE model as an HF JetMoe checkpoint loadable by ``transformers.JetMoeForCausalLM``."""
    cfg = model.cfg
    router = _check_exportable(cfg)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    for i in range(cfg.num_layers):  # HF always has the biases; a bias-free model exports zeros
        for part in ("attn", "ffn"):
            state.setdefault(f"layers.{i}.{part}.bias", torch.zeros(cfg.hidden_dim))
    hf_state = keymaps.rename(state, keymaps.JETMOE, "model", reverse=True)
    hf = {
        "architectures": ["JetMoeForCausalLM"], "model_type": "jetmoe", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_dim, "num_hidden_layers": cfg.num_layers, "num_key_value_heads": cfg.num_kv_heads,
        "kv_channels": cfg.head_dim, "intermediate_size": cfg.moe.expert_ffn_dim or cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len, "activation_function": "silu",
        "num_local_experts": router.num_experts, "num_experts_per_tok": router.top_k,
        "rms_norm_eps": cfg.norm_eps if cfg.final_norm_eps is None else cfg.final_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta, "aux_loss_coef": cfg.balance_coef,
        "torch_dtype": "float32",
    }  # fmt: skip
    if cfg.rope_scaling:
        hf["rope_scaling"] = dict(cfg.rope_scaling)

    def write(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return atomic_dir(Path(directory), write)

