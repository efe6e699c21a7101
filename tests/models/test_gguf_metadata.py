"""read_gguf on hand-written GGUF files: the config read from the metadata (and its defaults when
keys are missing), q/k rows and biases put back in HF order with the right head counts (hard-coded
expected rows, not the package's helper), and unreadable files."""

import gguf
import numpy as np
import pytest
import torch

from mixattn.models.hf.gguf import read_gguf

H, HKV, D = 4, 2, 8  # query heads, KV heads, head dim
HIDDEN = H * D


def _llama_cpp_rows(n_head):
    """llama.cpp's order of the rows of one projection: per head of D rows, [0, 4, 1, 5, 2, 6, 3, 7]."""
    return [h * D + r for h in range(n_head) for r in (0, 4, 1, 5, 2, 6, 3, 7)]


def _write(path, kv_heads=True, full=True, tokens=None, rope_linear=None, output=False):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(64)
    w.add_head_count(H)
    if kv_heads:
        w.add_head_count_kv(HKV)
    if full:
        w.add_context_length(4096)
        w.add_rope_freq_base(500000.0)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_vocab_size(50)
    if tokens is not None:
        w.add_token_list(tokens)
    if rope_linear is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_linear)
    hkv = HKV if kv_heads else H
    # each row holds its own HF row index (in column 0), written in llama.cpp's order
    q = np.arange(H * D, dtype=np.float32)[_llama_cpp_rows(H)][:, None].repeat(HIDDEN, 1)
    k = np.arange(hkv * D, dtype=np.float32)[_llama_cpp_rows(hkv)][:, None].repeat(HIDDEN, 1)
    w.add_tensor("token_embd.weight", np.ones((50, HIDDEN), dtype=np.float16))  # F16: read back as fp32
    w.add_tensor("blk.0.attn_q.weight", q)
    w.add_tensor("blk.0.attn_k.weight", k)
    w.add_tensor("blk.0.attn_q.bias", np.arange(H * D, dtype=np.float32)[_llama_cpp_rows(H)])
    w.add_tensor("blk.0.attn_v.weight", np.arange(hkv * D, dtype=np.float32)[_llama_cpp_rows(hkv)][:, None].repeat(HIDDEN, 1))
    if output:
        w.add_tensor("output.weight", np.ones((50, HIDDEN), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_metadata_becomes_the_hf_config(tmp_path):
    _write(tmp_path / "m.gguf", output=True)
    hf, t = read_gguf(tmp_path / "m.gguf")
    assert hf == {"model_type": "llama", "vocab_size": 50, "hidden_size": HIDDEN, "num_hidden_layers": 1,
                  "num_attention_heads": H, "num_key_value_heads": HKV, "intermediate_size": 64,
                  "max_position_embeddings": 4096, "rope_theta": 500000.0, "rms_norm_eps": pytest.approx(1e-6),
                  "tie_word_embeddings": False}  # fmt: skip
    # q and k rows back in HF order with their own head counts; v is never permuted
    assert t["model.layers.0.self_attn.q_proj.weight"][:, 0].tolist() == list(range(H * D))
    assert t["model.layers.0.self_attn.k_proj.weight"][:, 0].tolist() == list(range(HKV * D))
    assert t["model.layers.0.self_attn.q_proj.bias"].tolist() == list(range(H * D))
    assert t["model.layers.0.self_attn.v_proj.weight"][:, 0].tolist() == [float(r) for r in _llama_cpp_rows(HKV)]
    assert t["model.embed_tokens.weight"].dtype == torch.float32 and t["model.embed_tokens.weight"].shape == (50, HIDDEN)


def test_missing_metadata_takes_the_defaults(tmp_path):
    _write(tmp_path / "m.gguf", kv_heads=False, full=False, tokens=[f"t{i}" for i in range(37)], rope_linear=2.5)
    hf, t = read_gguf(tmp_path / "m.gguf")
    assert hf["num_key_value_heads"] == H  # no head_count_kv: one KV head per query head
    assert hf["vocab_size"] == 37  # from the token list
    assert hf["max_position_embeddings"] == 2048 and hf["rope_theta"] == 10000.0
    assert hf["rms_norm_eps"] == pytest.approx(1e-5) and hf["tie_word_embeddings"] is True
    assert hf["rope_scaling"] == {"rope_type": "linear", "factor": 2.5}
    assert t["model.layers.0.self_attn.k_proj.weight"][:, 0].tolist() == list(range(H * D))  # k with H heads


def test_unreadable_gguf_is_a_value_error_naming_the_file(tmp_path):
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(60)))
    with pytest.raises(ValueError, match="junk.gguf: unreadable GGUF file"):
        read_gguf(bad)
