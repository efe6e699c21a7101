"""Conversions: exact equivalences at initialisation, clear errors, and the CLI path."""


import pytest
import torch

import mixattn
from mixattn.cli import main
from mixattn.convert import dense_to_moh, gqa_to_moa, upcycle_bam
from mixattn.models import PRESETS, MixtureLM
from tests.conftest import assert_fp_close

transformers = pytest.importorskip("transformers")


def _llama(tmp_path=None, seed=0, **kw):
    """A tiny random HF Llama (GQA 4 heads / 2 KV heads), loaded into mixattn."""
    cfg = {**dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128), **kw}  # fmt: skip
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    if tmp_path is None:
        import tempfile

        tmp_path = tempfile.mkdtemp()
    hf.save_pretrained(tmp_path)
    return mixattn.load(tmp_path), tmp_path


IDS = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
TERMS = 97  # the longest reduction in _llama: vocab 97 > ffn 48 > hidden 32


def test_gqa_to_moa_is_exact_and_sparsifies():
    dense, _ = _llama()
    moa = gqa_to_moa(dense)
    assert moa.cfg.moa.router.num_experts == moa.cfg.moa.router.top_k == 2
    with torch.no_grad():
        assert_fp_close(moa(IDS).logits, dense(IDS).logits, TERMS)
        sparse = gqa_to_moa(dense, top_k=1)
        assert not torch.allclose(sparse(IDS).logits, dense(IDS).logits)
    with pytest.raises(ValueError, match="top_k=3"):
        gqa_to_moa(dense, top_k=3)


def test_dense_to_moh_all_heads_is_exact_and_fraction_matches():
    dense, _ = _llama()
    full = dense_to_moh(dense, active_fraction=1.0)
    with torch.no_grad():
        assert_fp_close(full(IDS).logits, dense(IDS).logits, TERMS)
        moh = dense_to_moh(dense, active_fraction=0.75)  # 2 shared + top-1 of 2 routed = 3 of 4
        out = moh(IDS)
    assert out.stats["active_head_fraction"] == 0.75
    for name, r in out.routers:  # measured, not just configured: every token runs exactly 3 heads
        assert torch.all(r.mask.sum(-1) + moh.cfg.moh.shared_heads == 3), name
    assert moh.cfg.balance_coef == 0.01 and moh.cfg.moh.scoring == "query_norm"
    with pytest.raises(ValueError, match="active_fraction"):
        dense_to_moh(dense, active_fraction=0.5)


@pytest.mark.parametrize("attention,kind", [("experts", "bam"), ("shared_kv", "bam_kv"), ("averaged", "dense")])
def test_bam_from_identical_models_equals_parent(attention, kind):
    dense, _ = _llama()
    bam = upcycle_bam([dense, dense, dense], attention=attention)
    assert bam.cfg.attention == kind and bam.cfg.moe.num_experts == 3
    with torch.no_grad():
        assert_fp_close(bam(IDS).logits, dense(IDS).logits, TERMS)


def test_bam_from_different_models_averages_the_rest_and_trains():
    a, _ = _llama(seed=0)
    b, _ = _llama(seed=1)
    bam = upcycle_bam([a, b])
    torch.testing.assert_close(bam.embed.weight, (a.embed.weight + b.embed.weight) / 2)
    torch.testing.assert_close(bam.layers[1].attn.q_proj[1], b.layers[1].attn.q_proj.weight)
    out = bam(IDS)
    (out.logits.logsumexp(-1).mean() + out.aux_loss).backward()
    assert bam.layers[0].ffn.router.proj.weight.grad.abs().sum() > 0  # the STE gate lets the router learn


def test_bam_rejects_different_shapes():
    a, _ = _llama()
    b, _ = _llama(intermediate_size=64)
    with pytest.raises(ValueError, match="ffn_dim"):
        upcycle_bam([a, b])
    with pytest.raises(ValueError, match="dense FFNs"):
        upcycle_bam([MixtureLM(PRESETS["tiny-moe"])] * 2)


def test_cli_convert_export_and_continue_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    _, src = _llama(tmp_path / "hf")
    assert main(["convert", str(src), "--to", "moa", "--out", str(tmp_path / "moa")]) == 0
    with torch.no_grad():
        assert_fp_close(mixattn.load(tmp_path / "moa")(IDS).logits, mixattn.load(src)(IDS).logits, TERMS)  # fmt: skip
    assert main(["convert", str(src), "--to", "moh", "--out", str(tmp_path / "moh")]) == 0
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc " * 2000)
    # continue-training on a byte corpus needs a byte-level model: use a native one
    tiny = MixtureLM(PRESETS["tiny"].evolve(vocab_size=256))
    mixattn.save(tiny, tmp_path / "tiny")
    assert main(["convert", str(tmp_path / "tiny"), "--to", "moh", "--active-fraction", "0.75",
                 "--out", str(tmp_path / "tmoh")]) == 0  # fmt: skip
    assert main(["train", "--init", str(tmp_path / "tmoh"), "--corpus", str(corpus), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1",
                 "--out", str(tmp_path / "ct")]) == 0  # fmt: skip
    # BAM from models with different shapes: a one-line error and nothing written
    b = MixtureLM(PRESETS["tiny"].evolve(ffn_dim=96))
    mixattn.save(b, tmp_path / "other")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "tiny"), str(tmp_path / "other"), "--to", "bam",
                 "--out", str(tmp_path / "bam")]) == 2  # fmt: skip
    assert "ffn_dim" in capsys.readouterr().err and not (tmp_path / "bam").exists()
    assert main(["export", str(tmp_path / "moa"), "--format", "llama", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
