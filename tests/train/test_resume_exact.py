"""Resume is bit-exact with every piece of state a run carries between steps: router noise (the
global RNG), the DeepSeek-V3 selection bias (`bias_rate`), global balance buffered over gradient
accumulation, AdamW moments, the step counter and the schedule. And Ctrl-C inside `train()` leaves a
checkpoint at the step where it stopped, from which resume is exact too.

Equality is `torch.equal`: the split and whole runs execute the same operations in the same order on
one thread, so any difference is a bug, not rounding."""

import dataclasses
import json
import os
import signal
import threading

import pytest
import torch

from mixattn.models import PRESETS, MixtureLM, checkpoint
from mixattn.train.data import load_corpus
from mixattn.train.loop import TrainConfig, train

CFG = TrainConfig(steps=8, batch_size=2, seq_len=16, grad_accum=2, eval_every=4, eval_batches=1, warmup_steps=2,
                  lr=3e-3, log_every=1)  # fmt: skip


def _config():
    """tiny-moe with router noise, the selection bias and global balance."""
    base = PRESETS["tiny-moe"]
    router = dataclasses.replace(base.moe.router, noise_std=0.5, bias_rate=0.05)
    return base.evolve(balance="global", moe=dataclasses.replace(base.moe, router=router))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("".join(f"row {i % 11}: pack my box with five dozen liquor jugs.\n" for i in range(300)))
    return load_corpus(str(root))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same_state(a: MixtureLM, b: MixtureLM):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("whole")
    torch.manual_seed(0)
    model = MixtureLM(_config())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model, data, CFG, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, _rows(out)


@pytest.mark.parametrize("stop", [3, 5])  # inside an evaluation interval, and after one
def test_resume_is_bit_exact_with_noise_bias_global_balance_and_accumulation(tmp_path, data, whole, stop):
    ref, ref_rows = whole
    torch.manual_seed(0)
    model = MixtureLM(_config())
    train(model, data, CFG, tmp_path, stop_at=stop, progress=False)
    assert checkpoint.load_train_state(tmp_path / "checkpoint")["step"] == stop
    torch.manual_seed(999)  # a fresh process: other RNG state, other initial weights
    resumed = MixtureLM(_config())
    train(resumed, data, CFG, tmp_path, resume=True, progress=False)
    bias = resumed.router("layers.0.ffn").selection_bias
    assert bias.abs().sum() > 0  # the bias did move, so its restore is under test
    _assert_same_state(resumed, ref)
    timeless = [[{k: v for k, v in r.items() if k != "tok_s"} for r in rows] for rows in (_rows(tmp_path), ref_rows)]
    assert timeless[0] == timeless[1]  # same losses, validation and routing statistics, no duplicate rows


def test_noise_is_drawn_from_the_restored_rng(tmp_path, data, whole):
    """Without the RNG restore the noise after resume differs: the test above would fail. Checked
    here directly: the saved RNG state is the one the next step draws from."""
    torch.manual_seed(0)
    model = MixtureLM(_config())
    train(model, data, CFG, tmp_path, stop_at=2, progress=False)
    after_stop = torch.get_rng_state()
    state = checkpoint.load_train_state(tmp_path / "checkpoint")
    assert torch.equal(state["rng"], after_stop)


def test_ctrl_c_saves_the_step_it_stopped_at_and_resume_is_exact(tmp_path, data, whole):
    """SIGINT delivered during step 3 (from a timer thread, as a terminal's Ctrl-C) finishes that step,
    saves a checkpoint and raises KeyboardInterrupt; resuming gives the uninterrupted run's weights."""
    ref, _ = whole
    torch.manual_seed(0)
    model = MixtureLM(_config())
    sent = threading.Event()
    step = model.forward
    calls = {"n": 0}

    def forward(*a, **kw):  # the 5th training forward is step 3's first micro-batch (2 per step)
        calls["n"] += model.training
        if model.training and calls["n"] == 5 and not sent.is_set():
            sent.set()
            os.kill(os.getpid(), signal.SIGINT)
        return step(*a, **kw)

    model.forward = forward
    with pytest.raises(KeyboardInterrupt):
        train(model, data, CFG, tmp_path, progress=False)
    assert sent.is_set()
    assert checkpoint.load_train_state(tmp_path / "checkpoint")["step"] == 3
    torch.manual_seed(7)
    resumed = MixtureLM(_config())
    train(resumed, data, CFG, tmp_path, resume=True, progress=False)
    _assert_same_state(resumed, ref)
