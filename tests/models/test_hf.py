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


def write_llama_gguf(hf_model, path):
    """A tiny GGUF as llama.cpp's converter writes it: llama.* metadata, blk.* names, permuted q/k."""
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
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
    for key, t in hf_model.state_dict().items():
        if key not in names:
            i, rest = key.split(".")[2], ".".join(key.split(".")[3:-1])
            names[key] = f"blk.{i}.{per_layer[rest]}.weight"
        if c.tie_word_embeddings and key == "lm_head.weight":
            continue
        t = t.detach().float()
        if "q_proj" in key:
            t = permute_for_gguf(t, c.num_attention_heads)
        elif "k_proj" in key:
            t = permute_for_gguf(t, c.num_key_value_heads)
        w.add_tensor(names[key], t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_round_trip_matches_source(tied, tmp_path):
    hf = _hf_llama(num_key_value_heads=2, tie_word_embeddings=tied)
    write_llama_gguf(hf, tmp_path / "m.gguf")
    ours = mixattn.load(tmp_path / "m.gguf")
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, hf(_ids()).logits, atol=1e-4, rtol=1e-4)


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
