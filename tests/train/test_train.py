"""Training, checkpoints and data: loss goes down, resume is exact, bad input is a clear error."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import mixattn
from mixattn.models import PRESETS, MixtureLM, checkpoint
from mixattn.train.data import ByteTokenizer, TokenData, corpus_files, load_corpus
from mixattn.train.loop import TrainConfig, lr_at, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    text = "".join(f"line {i % 7}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    (root / "a.txt").write_text(text)
    (root / "b.txt").write_text(text[::-1])
    return load_corpus(str(root))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))


CFG = TrainConfig(steps=30, batch_size=4, seq_len=32, eval_every=15, eval_batches=2, warmup_steps=3, lr=3e-3)


def test_training_lowers_the_loss(tmp_path, data):
    torch.manual_seed(0)
    model = MixtureLM(PRESETS["tiny-moe"])
    first = train(model, data, dataclasses.replace(CFG, steps=1, eval_every=1), tmp_path / "a", progress=False)
    torch.manual_seed(0)
    model = MixtureLM(PRESETS["tiny-moe"])
    last = train(model, data, CFG, tmp_path / "b", progress=False)
    assert last["val_loss"] < first["val_loss"] - 0.5
    assert last["fluctuation"] is not None and 0 <= last["fluctuation"] <= 1
    # MaxVio of the final validation, recounted here: (max load - mean load) / mean load per router, averaged
    model.eval()
    counts = {}
    with torch.no_grad():
        for i in range(CFG.eval_batches):
            x, _ = data.batch("val", i, CFG.batch_size, CFG.seq_len, CFG.seed)
            for name, r in model(x).routers:
                counts[name] = counts.get(name, 0) + r.counts().double()
    vios = [float((c.max() - c.mean()) / c.mean()) for c in counts.values()]
    assert len(vios) == 2 and last["max_vio"] == pytest.approx(sum(vios) / len(vios), rel=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any("tok_s" in x for x in lines) and any("val_loss" in x for x in lines)


def test_resume_after_interruption_is_exact(tmp_path, data):
    def run(stop_first: bool):
        torch.manual_seed(0)
        model = MixtureLM(PRESETS["tiny-moh"])
        out = tmp_path / ("split" if stop_first else "whole")
        if stop_first:
            train(model, data, CFG, out, stop_at=12, progress=False)
            torch.manual_seed(123)  # a fresh process: different RNG, fresh model
            model = MixtureLM(PRESETS["tiny-moh"])
            train(model, data, CFG, out, resume=True, progress=False)
        else:
            train(model, data, CFG, out, progress=False)
        return model

    a, b = run(False), run(True)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_global_balance_and_aux_free_bias_train(tmp_path, data):
    base = PRESETS["tiny-moe"]
    router = dataclasses.replace(base.moe.router, bias_rate=0.01)
    cfg = base.evolve(balance="global", moe=dataclasses.replace(base.moe, router=router))
    model = MixtureLM(cfg)
    train(model, data, dataclasses.replace(CFG, steps=4, grad_accum=2, eval_every=4), tmp_path, progress=False)
    assert model.router("layers.0.ffn").selection_bias.abs().sum() > 0


def test_schedules():
    cos = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(99, cos) == pytest.approx(0.1, abs=1e-3)
    wsd = dataclasses.replace(cos, schedule="wsd", decay_frac=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0 and lr_at(99, wsd) < 0.15
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")


def test_save_load_round_trip_and_mismatch(tmp_path):
    model = MixtureLM(PRESETS["tiny-moa-moe"])
    mixattn.save(model, tmp_path / "ck")
    again = mixattn.load(tmp_path / "ck")
    ids = torch.randint(0, 256, (1, 9))
    assert torch.equal(model(ids).logits, again(ids).logits)
    # a config that doesn't match the tensors
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    meta["model"]["layers"]["moe"]["expert_ffn_dim"] = 96
    (tmp_path / "ck" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"layers.0.ffn.input_linear.weight.*\(4, 128, 64\).*\(4, 192, 64\)"):
        mixattn.load(tmp_path / "ck")


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        mixattn.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        mixattn.load(tmp_path / "empty")
    model = MixtureLM(PRESETS["tiny"])
    mixattn.save(model, tmp_path / "ck")
    blob = (tmp_path / "ck" / "model.safetensors").read_bytes()
    (tmp_path / "ck" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        mixattn.load(tmp_path / "ck")


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path):
    model = MixtureLM(PRESETS["tiny"])
    mixattn.save(model, tmp_path / "ck")

    def boom(tmp):
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_dir(tmp_path / "ck", boom)
    assert not (tmp_path / "ck" / "partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    mixattn.load(tmp_path / "ck")


def test_data_split_is_deterministic_and_batches_are_pure(data):
    assert len(data.train) > 10 * len(data.val) > 0
    a = data.batch("train", 5, 3, 16, seed=1)
    b = data.batch("train", 5, 3, 16, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0][:, 1:], a[1][:, :-1])
    assert not torch.equal(a[0], data.batch("train", 6, 3, 16, seed=1)[0])


def test_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus(str(tmp_path / "nope"))
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(tmp_path / "e"))
    short = TokenData(np.zeros(5, np.uint8), np.zeros(5, np.uint8), "short")
    with pytest.raises(ValueError, match="seq_len"):
        short.batch("train", 0, 1, 16)
    assert ByteTokenizer().decode(ByteTokenizer().encode("héllo")) == "héllo"


def test_stdlib_corpus_is_offline():
    files = corpus_files("stdlib")
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
