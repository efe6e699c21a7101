"""GGUF (llama.cpp) files in: Llama-architecture models, any quantisation the ``gguf`` package can
dequantise, loaded as fp32.

llama.cpp stores q_proj/k_proj rows permuted for its interleaved RoPE; they are permuted back to
HF's rotate-half layout (the inverse of llama.cpp's ``convert_hf_to_gguf`` permutation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..decoder import MixtureLM
from . import keymaps
from .llama import config_from_hf, from_hf_tensors


def permute_for_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows (what convert_hf_to_gguf does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp interleaved rows -> HF rotate-half rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF-style Llama config dict, HF-named fp32 tensors) from a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ValueError(f"{path}: unreadable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(f"{path}: Llama-3 rope_freqs GGUF tensors are not supported; load the HF directory")
    a = f"{arch}."
    H, Hkv = int(_field(reader, a + "attention.head_count")), int(_field(reader, a + "attention.head_count_kv", 0))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    hf = {
        "model_type": "llama",
        "vocab_size": int(_field(reader, a + "vocab_size", len(tokens.data) if tokens else 0)),
        "hidden_size": int(_field(reader, a + "embedding_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")),
        "num_attention_heads": H,
        "num_key_value_heads": Hkv or H,
        "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if _field(reader, a + "rope.scaling.type") == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(_field(reader, a + "rope.scaling.factor"))}
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # ggml lists the fastest dimension first
        try:
            arr = dequantize(t.data, t.tensor_type).reshape(shape)
        except (ValueError, NotImplementedError) as e:
            raise ValueError(f"{path}: cannot dequantise tensor {t.name!r} ({e})") from None
        tensors[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32))  # a writable copy
    tensors = keymaps.rename(tensors, keymaps.GGUF_TO_HF_LLAMA, str(path))
    for key, w in tensors.items():
        if key.endswith("q_proj.weight") or key.endswith("q_proj.bias"):
            tensors[key] = unpermute_from_gguf(w, H)
        elif key.endswith("k_proj.weight") or key.endswith("k_proj.bias"):
            tensors[key] = unpermute_from_gguf(w, Hkv or H)
    return hf, tensors


def load_gguf(path: str | Path) -> MixtureLM:
    hf, tensors = read_gguf(path)
    return from_hf_tensors(config_from_hf(hf, str(path)), tensors, str(path))
