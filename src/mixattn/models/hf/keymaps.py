"""Declarative tensor-name maps between external checkpoint formats and ``MixtureLM``.

Each map is a list of (external pattern, our pattern) with ``{i}`` standing for the layer index.
``rename`` applies a map and refuses any tensor it does not know, naming it.
"""

from __future__ import annotations

import re

import torch

LLAMA = [  # HF Llama / Mistral / Qwen2 / SmolLM
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.{w}", f"layers.{{i}}.attn.{p}_proj.{w}")
      for p in "qkv" for w in ("weight", "bias")],
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight"),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.attn.o_proj.bias"),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.weight"),
    *[(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"layers.{{i}}.ffn.{p}_proj.weight") for p in ("gate", "up", "down")],
]  # fmt: skip

GGUF_TO_HF_LLAMA = [  # llama.cpp tensor names -> HF Llama names
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    *[(f"blk.{{i}}.attn_{g}.{w}", f"model.layers.{{i}}.self_attn.{h}_proj.{w}")
      for g, h in (("q", "q"), ("k", "k"), ("v", "v")) for w in ("weight", "bias")],
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    *[(f"blk.{{i}}.ffn_{p}.weight", f"model.layers.{{i}}.mlp.{p}_proj.weight") for p in ("gate", "up", "down")],
]  # fmt: skip

JETMOE = [  # HF JetMoe (transformers >= 4.40, "model." prefix)
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
    ("model.layers.{i}.self_attention.kv_proj.weight", "layers.{i}.attn.kv_proj.weight"),
    ("model.layers.{i}.self_attention.experts.input_linear.weight", "layers.{i}.attn.input_linear.weight"),
    ("model.layers.{i}.self_attention.experts.output_linear.weight", "layers.{i}.attn.output_linear.weight"),
    ("model.layers.{i}.self_attention.experts.bias", "layers.{i}.attn.bias"),
    ("model.layers.{i}.self_attention.experts.router.layer.weight", "layers.{i}.attn.router.proj.weight"),
    ("model.layers.{i}.mlp.input_linear.weight", "layers.{i}.ffn.input_linear.weight"),
    ("model.layers.{i}.mlp.output_linear.weight", "layers.{i}.ffn.output_linear.weight"),
    ("model.layers.{i}.mlp.bias", "layers.{i}.ffn.bias"),
    ("model.layers.{i}.mlp.router.layer.weight", "layers.{i}.ffn.router.proj.weight"),
]


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)") + "$")


def rename(tensors: dict[str, torch.Tensor], keymap, source: str, reverse: bool = False) -> dict[str, torch.Tensor]:
    """Rename every tensor through ``keymap`` (external -> ours, or ours -> external with ``reverse``)."""
    pairs = [(b, a) if reverse else (a, b) for a, b in keymap]
    compiled = [(_compile(src), dst) for src, dst in pairs]
    out = {}
    for key, value in tensors.items():
        for rx, dst in compiled:
            m = rx.match(key)
            if m:
                out[dst.replace("{i}", m.group(1)) if m.groups() else dst] = value
                break
        else:
            raise ValueError(f"{source}: unexpected tensor {key!r} (no mapping for it)")
    return out
