"""One training step against a reference computed here: the logged loss and aux loss are the means
over the step's micro-batches of the train split, the learning rate is the schedule's, the
selection bias moves by rate * sign(mean load - load) from the step's own counts, and a skipped
(non-finite) step leaves the bias alone. Bit-exact resume cannot see these: a split run and a
whole run share the same bug."""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from mixattn.models import PRESETS, MixtureLM, checkpoint
from mixattn.train.data import load_corpus
from mixattn.train.loop import TrainConfig, lr_at, train

CFG = TrainConfig(steps=3, batch_size=2, seq_len=16, grad_accum=2, eval_every=3, eval_batches=1, warmup_steps=4,
                  lr=3e-3, log_every=1)  # fmt: skip


def _config():
    base = PRESETS["tiny-moe"]
    router = dataclasses.replace(base.moe.router, bias_rate=0.05)
    return base.evolve(moe=dataclasses.replace(base.moe, router=router))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text("".join(f"{i % 13} sphinx of black quartz, judge my vow.\n" for i in range(300)))
    return load_corpus(str(root))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))


def test_first_step_logs_the_micro_batch_means_and_moves_the_bias(tmp_path, data):
    torch.manual_seed(0)
    model = MixtureLM(_config())
    before = copy.deepcopy(model).train()
    ces, auxes, counts = [], [], {}
    with torch.no_grad():
        for micro in range(CFG.grad_accum):  # step 0's micro-batches, on the weights before the step
            x, y = data.batch("train", micro, CFG.batch_size, CFG.seq_len, CFG.seed)
            out = before(x)
            ces.append(float(F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())))
            auxes.append(float(out.aux_loss))
            for name, r in out.routers:
                counts[name] = counts.get(name, 0) + r.counts()
    train(model, data, CFG, tmp_path, stop_at=1, progress=False)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1
    assert row["loss"] == pytest.approx(sum(ces) / 2, rel=1e-5) and row["aux"] == pytest.approx(sum(auxes) / 2, rel=1e-5)
    state = checkpoint.load_train_state(tmp_path / "checkpoint")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [lr_at(0, CFG)] * 2  # warm-up: lr / 4
    assert lr_at(0, CFG) != CFG.lr
    for name, c in counts.items():
        c = c.double()
        bias = model.router(name).selection_bias
        assert torch.equal(bias, (0.05 * torch.sign(c.mean() - c)).to(bias.dtype)), name


def test_a_skipped_step_leaves_the_bias_alone(tmp_path, data):
    torch.manual_seed(0)
    model = MixtureLM(_config())
    real = model.forward

    def nan_logits(*a, **kw):  # every training forward's loss is NaN: each step is skipped
        out = real(*a, **kw)
        return dataclasses.replace(out, logits=out.logits * float("nan")) if model.training else out

    model.forward = nan_logits
    train(model, data, dataclasses.replace(CFG, on_nonfinite="skip", eval_every=10, steps=2), tmp_path, progress=False)
    for name, _ in model.named_modules():
        if name.endswith("ffn"):
            assert model.router(name).selection_bias.abs().sum() == 0, name
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("skipped" in r for r in rows) == 2
