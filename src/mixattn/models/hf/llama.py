"""HF Llama-family checkpoints (Llama, Mistral, Qwen2, SmolLM) in and out of ``MixtureLM``.

A directory with ``config.json`` and safetensors (single or sharded) is read without transformers'
modeling code: the config is mapped field by field and the tensors renamed through
``keymaps.LLAMA``. Export writes the reverse, loadable by ``transformers.LlamaForCausalLM``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ...paths import atomic_dir, read_json
from ..checkpoint import load_state
from ..config import MixtureConfig
from ..decoder import MixtureLM
from . import keymaps

log = logging.getLogger(__name__)
LLAMA_TYPES = ("llama", "mistral", "qwen2")


def rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from a transformers 4.x (rope_theta + rope_scaling) or 5.x (rope_parameters) config."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = {k: v for k, v in params.items() if k != "rope_theta"} if kind != "default" else None
    return theta, scaling


def config_from_hf(hf: dict, source: str) -> MixtureConfig:
    """Map an HF Llama-family config.json (dict) onto a dense ``MixtureConfig``."""
    mt = hf.get("model_type")
    if mt not in LLAMA_TYPES:
        raise ValueError(f"{source}: model_type {mt!r} is not a Llama-family type {LLAMA_TYPES}")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise ValueError(f"{source}: only SiLU-gated MLPs without bias are supported")
    if hf.get("sliding_window") and (mt != "qwen2" or hf.get("use_sliding_window")):
        log.warning("%s: sliding_window=%s is ignored (dense attention); outputs match only within the window",
                    source, hf["sliding_window"])  # fmt: skip
    try:
        H, d = hf["num_attention_heads"], hf["hidden_size"]
        theta, scaling = rope_settings(hf)
        return MixtureConfig().evolve(
            vocab_size=hf["vocab_size"],
            hidden_dim=d,
            num_layers=hf["num_hidden_layers"],
            num_heads=H,
            num_kv_heads=hf.get("num_key_value_heads") or H,
            head_dim=hf.get("head_dim") or d // H,
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)) or mt == "qwen2",
            attention_out_bias=bool(hf.get("attention_bias", False)) and mt != "qwen2",
        )
    except KeyError as e:
        raise ValueError(f"{source}: config.json lacks {e.args[0]!r}") from None


def config_to_hf(cfg: MixtureConfig) -> dict:
    if cfg.attention_bias != cfg.attention_out_bias:
        raise ValueError("llama export: q/k/v and output biases must both be on or off (Qwen2-style is not Llama)")
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_dim, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.attention_bias, "mlp_bias": False,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "torch_dtype": "float32",
    }  # fmt: skip
    return hf


def read_hf_config(directory: Path) -> dict:
    return read_json(directory / "config.json", missing=f"{directory}: no config.json")


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, as fp32."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        has_bin = bool(list(directory.glob("*.bin")))
        hint = " (only PyTorch .bin weights found; convert them to safetensors)" if has_bin else ""
        raise FileNotFoundError(f"{directory}: no .safetensors weights{hint}")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: unreadable safetensors file ({e})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def from_hf_tensors(cfg: MixtureConfig, hf_tensors: dict, source: str, keymap=keymaps.LLAMA) -> MixtureLM:
    """Build the model for ``cfg`` and fill it with HF-named tensors renamed through ``keymap``."""
    tensors = keymaps.rename(hf_tensors, keymap, source)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some checkpoints store the tied copy too
    model = MixtureLM(cfg)
    load_state(model, tensors, source)
    return model


def load_llama(directory: str | Path) -> MixtureLM:
    directory = Path(directory)
    cfg = config_from_hf(read_hf_config(directory), str(directory))
    return from_hf_tensors(cfg, read_safetensors(directory), str(directory))


def export_llama(model: MixtureLM, directory: str | Path) -> Path:
    """Write a dense model as an HF Llama checkpoint (config.json + model.safetensors)."""
    cfg = model.cfg
    kinds = {cfg.attention_at(i) for i in range(cfg.num_layers)} | {cfg.ffn_at(i) for i in range(cfg.num_layers)}
    if kinds != {"dense"} or cfg.block != "sequential" or cfg.final_norm_eps not in (None, cfg.norm_eps):
        raise ValueError("llama export needs a dense, sequential model; use the native format (mixattn.save)")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    hf = keymaps.rename(state, keymaps.LLAMA, "model", reverse=True)

    def write(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return atomic_dir(Path(directory), write)
