"""Compatibility with the real thing: transformers' own model classes built from tiny random
configs, offline, compared in fp32 at atol 1e-4."""

import json
import os

import numpy as np
import pytest
import torch

import mixattn
from mixattn.models.hf.gguf import permute_for_gguf

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)  # fmt: skip


def _hf_llama(kind="llama", **kw):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]  # fmt: skip
    torch.manual_seed(0)
    model = cls[1](cls[0](**{**SMALL, **kw})).eval()
    with torch.no_grad():  # HF zero-inits some biases/norms; random values make the test able to fail
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ids():
    return torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))


LLAMA_CASES = {
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "rope-llama3": dict(num_key_value_heads=1, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "rope-linear": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0),
    "attention-bias": dict(num_key_value_heads=2, attention_bias=True),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_logits_and_greedy_generation_match_transformers(case, tmp_path):
    hf = _hf_llama(**LLAMA_CASES[case])
    hf.save_pretrained(tmp_path)
    ours = mixattn.load(tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
        want = hf.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:1], 8, stop_tokens=(hf.config.eos_token_id,)), want)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_qwen2_and_mistral_match_transformers(kind, tmp_path):
    hf = _hf_llama(kind, num_key_value_heads=2)
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(mixattn.load(tmp_path)(_ids()).logits, hf(_ids()).logits, atol=1e-4, rtol=1e-4)


def test_llama_export_loads_in_transformers(tmp_path):
    hf = _hf_llama(num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "src")
    ours = mixattn.load(tmp_path / "src")
    mixattn.export(ours, tmp_path / "out", format="llama")
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()).logits, hf(_ids()).logits, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="dense"):
        mixattn.export(mixattn.MixtureLM(mixattn.from_name("tiny-moe")), tmp_path / "bad", format="llama")
    assert not (tmp_path / "bad").exists()


def _hf_jetmoe():
    cfg = transformers.JetMoeConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                                    kv_channels=8, intermediate_size=37, num_local_experts=4, num_experts_per_tok=2,
                                    rms_norm_eps=1e-5, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.JetMoeForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases at zero and weights tiny: randomise so every term matters
        for _, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_jetmoe_import_and_export_round_trip(tmp_path):
    hf = _hf_jetmoe()
    hf.save_pretrained(tmp_path / "src")
    ours = mixattn.load(tmp_path / "src")
    assert ours.cfg.attention == "moa" and ours.cfg.ffn == "moe"
    ids = torch.randint(0, 99, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
        torch.testing.assert_close(ours(ids).logits, want, atol=1e-4, rtol=1e-4)
        mixattn.export(ours, tmp_path / "out", format="jetmoe")
        again = transformers.JetMoeForCausalLM.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(again(ids).logits, want, atol=1e-4, rtol=1e-4)


def gguf_rows(n_head: int) -> list[int]:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py's ``permute``), hard-coded for head_dim 8:
    within a head, GGUF row 2i holds HF row i and row 2i + 1 holds HF row i + 4 (RoPE pairs
    interleaved instead of rotate-half)."""
    return [h * 8 + r for h in range(n_head) for r in (0, 4, 1, 5, 2, 6, 3, 7)]


def q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's block_q8_0, written out: per block of 32 values d = fp16(max|x| / 127) then 32 int8
    q = round(x / d). Returns (bytes (rows, cols / 32 * 34), the dequantised values d * q)."""
    blocks = w.reshape(-1, 32)
    d = (np.abs(blocks).max(1, keepdims=True) / 127).astype(np.float16)
    q = np.clip(np.round(blocks / d.astype(np.float32)), -127, 127).astype(np.int8)
    raw = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1).reshape(w.shape[0], -1)
    return raw, (d.astype(np.float32) * q).reshape(w.shape)


def write_llama_gguf(hf_model, path, arch="llama", quantize=(), raw_type=None, extra=(), drop=()):
    """A tiny GGUF as llama.cpp's converter writes it: llama.* metadata, blk.* names, q/k rows in
    llama.cpp's order. HF keys in ``quantize`` are stored as Q8_0 (or as zero bytes of type ``raw_type``)
    and the model's weights are set to their dequantised values so that the
    GGUF and the HF model stay the same model. ``extra`` names additional tensors, ``drop`` omits some."""
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    params = dict(hf_model.named_parameters())
    for key, t in hf_model.state_dict().items():
        if key not in names:
            i, rest = key.split(".")[2], ".".join(key.split(".")[3:-1])
            names[key] = f"blk.{i}.{per_layer[rest]}.weight"
        if (c.tie_word_embeddings and key == "lm_head.weight") or names[key] in drop:
            continue
        t = t.detach().float().numpy()
        if "q_proj" in key:
            t = t[gguf_rows(c.num_attention_heads)]
        elif "k_proj" in key:
            t = t[gguf_rows(c.num_key_value_heads)]
        if key in quantize:  # per-row blocks, so the dequantised rows permute back like the fp32 ones
            raw, deq = q8_0(t)
            if raw_type is not None:  # another type: zero bytes of its size
                block, size = gguf.GGML_QUANT_SIZES[raw_type]
                raw = np.zeros((len(t), t.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(names[key], raw, raw_dtype=raw_type or gguf.GGMLQuantizationType.Q8_0)
            inverse = np.argsort(gguf_rows(len(t) // 8)) if "q_proj" in key or "k_proj" in key else slice(None)
            with torch.no_grad():
                params[key].copy_(torch.from_numpy(deq[inverse]))
        else:
            w.add_tensor(names[key], t.astype(np.float32))
    for name in extra:
        w.add_tensor(name, np.zeros(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_permutation_is_llama_cpp_order():
    """The package's helpers against the hard-coded llama.cpp order, on rows labelled by index."""
    from mixattn.models.hf.gguf import unpermute_from_gguf

    hf_rows = torch.arange(24.0)[:, None].expand(24, 3)  # 3 heads of head_dim 8
    gguf_order = torch.tensor(gguf_rows(3), dtype=torch.float32)[:, None].expand(24, 3)
    assert gguf_rows(1) == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(permute_for_gguf(hf_rows, 3), gguf_order)
    assert torch.equal(unpermute_from_gguf(gguf_order, 3), hf_rows)
    assert torch.equal(unpermute_from_gguf(torch.arange(16.0), 2), torch.tensor(gguf_rows(2)).argsort().float())


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_round_trip_matches_source(tied, tmp_path):
    hf = _hf_llama(num_key_value_heads=2, tie_word_embeddings=tied)
    write_llama_gguf(hf, tmp_path / "m.gguf")
    ours = mixattn.load(tmp_path / "m.gguf")
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, hf(_ids()).logits, atol=1e-4, rtol=1e-4)


Q8_KEYS = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
           "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight")  # fmt: skip


def test_gguf_q8_0_tensors_dequantise_exactly(tmp_path):
    """Q8_0 q/k (permuted after dequantisation), FFN and embedding tensors: read_gguf returns
    exactly d * q in HF row order, and the model matches transformers with those weights."""
    from mixattn.models.hf.gguf import read_gguf

    hf = _hf_llama(num_key_value_heads=2, tie_word_embeddings=False)
    before = {k: hf.state_dict()[k].clone() for k in Q8_KEYS}
    write_llama_gguf(hf, tmp_path / "m.gguf", quantize=Q8_KEYS)
    _, tensors = read_gguf(tmp_path / "m.gguf")
    for key in Q8_KEYS:
        want = hf.state_dict()[key]  # the dequantised values, in HF order
        assert not torch.equal(want, before[key])  # quantisation changed them: the check has teeth
        assert torch.equal(tensors[key], want), key
    with torch.no_grad():
        torch.testing.assert_close(mixattn.load(tmp_path / "m.gguf")(_ids()).logits, hf(_ids()).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip


def test_gguf_error_paths(tmp_path):
    import gguf

    from mixattn.models.hf.gguf import read_gguf

    hf = _hf_llama(num_key_value_heads=2)
    with pytest.raises(FileNotFoundError, match="no such GGUF file: .*missing.gguf"):
        read_gguf(tmp_path / "missing.gguf")
    write_llama_gguf(hf, tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match=r"gpt2.gguf: GGUF architecture 'gpt2' is not supported \(only 'llama'\)"):
        mixattn.load(tmp_path / "gpt2.gguf")
    write_llama_gguf(hf, tmp_path / "l3.gguf", extra=("rope_freqs.weight",))
    with pytest.raises(ValueError, match="l3.gguf: Llama-3 rope_freqs GGUF tensors are not supported"):
        mixattn.load(tmp_path / "l3.gguf")
    write_llama_gguf(hf, tmp_path / "q81.gguf", quantize=Q8_KEYS[:1], raw_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ValueError, match="q81.gguf: cannot dequantise tensor 'blk.0.attn_q.weight'"):
        mixattn.load(tmp_path / "q81.gguf")
    write_llama_gguf(hf, tmp_path / "extra.gguf", extra=("blk.0.attn_q_norm.weight",))
    with pytest.raises(ValueError, match="extra.gguf: unexpected tensor 'blk.0.attn_q_norm.weight'"):
        mixattn.load(tmp_path / "extra.gguf")
    write_llama_gguf(hf, tmp_path / "short.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"short.gguf: missing tensor 'layers.1.ffn.up_proj.weight'"):
        mixattn.load(tmp_path / "short.gguf")


# ----------------------------------------------------------------------------- bad input


def test_bad_sources_give_clear_errors(tmp_path):
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        mixattn.load(tmp_path / "noconfig")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        mixattn.load(tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError, match="known names: smollm2-135m"):
        mixattn.load("llama-70b")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=".gguf"):
        mixattn.load(tmp_path / "x.bin")


def _saved(tmp_path, **kw):
    hf = _hf_llama(num_key_value_heads=2, **kw)
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    return load_file(str(tmp_path / "model.safetensors"))


def test_missing_extra_and_misshaped_tensors(tmp_path):
    from safetensors.torch import save_file

    tensors = _saved(tmp_path, tie_word_embeddings=False)
    path = str(tmp_path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, path)
    with pytest.raises(ValueError, match=r"missing tensor 'layers.1.ffn.up_proj.weight'"):
        mixattn.load(tmp_path)
    save_file({**tensors, "model.layers.0.self_attn.rotary.inv_freq": torch.zeros(4)}, path)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.self_attn.rotary.inv_freq'"):
        mixattn.load(tmp_path)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(8, 32)
    save_file(bad, path)
    with pytest.raises(ValueError, match=r"'layers.0.attn.q_proj.weight' has shape \(8, 32\).*\(32, 32\)"):
        mixattn.load(tmp_path)


def test_truncated_files(tmp_path):
    _saved(tmp_path / "st")
    blob = (tmp_path / "st" / "model.safetensors").read_bytes()
    (tmp_path / "st" / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(ValueError, match="unreadable safetensors"):
        mixattn.load(tmp_path / "st")
    write_llama_gguf(_hf_llama(num_key_value_heads=2), tmp_path / "m.gguf")
    blob = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="m.gguf"):
        mixattn.load(tmp_path / "m.gguf")
