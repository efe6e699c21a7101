"""`mixattn train --nproc N` end to end (torchrun, gloo): the run's checkpoint is an ordinary one, a
single process resumes it, and bad launch input is a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import mixattn
from mixattn.cli import main


def _train(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MIXATTN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mixattn", "train", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def common(tmp_path) -> list[str]:
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200)
    # JetMoE gates on the FFN and its norm eps, so that the run can be exported as an HF JetMoe checkpoint
    return ["--preset", "tiny-moa-moe", "--corpus", str(corpus), "--steps", "4", "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "2", "--eval-batches", "1", "--out", str(tmp_path / "run"),
            "--set", "moe.router.gate_norm=softmax_topk", "--set", "norm_eps=1e-6"]  # fmt: skip


def test_nproc_2_trains_saves_a_consolidated_checkpoint_exports_and_resumes_in_one_process(tmp_path, common, monkeypatch, capsys):
    done = _train([*common, "--nproc", "2", "--stop-at", "2"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoint"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2]  # one writer: rank 0
    model = mixattn.load(str(ckpt))  # what export and generate read
    assert model.layers[0].ffn.input_linear.weight.shape[0] == 4 and torch.isfinite(model.embed.weight).all()
    assert main(["export", str(ckpt), "--format", "jetmoe", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--resume", "--out", str(tmp_path / "run")]) == 0  # plain single process
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 4


@pytest.mark.slow
def test_nproc_errors_name_the_problem(tmp_path, common, capsys):
    assert main(["train", *common, "--nproc", "0"]) == 2
    assert "--nproc" in capsys.readouterr().err
    done = _train([*common, "--nproc", "3"], tmp_path)  # 4 experts over 3 ranks
    assert done.returncode != 0 and "4 experts cannot be split evenly over ep=3 ranks" in done.stderr, done.stderr[-3000:]
    done = _train([*common, "--overwrite", "--nproc", "2", "--batch-size", "3"], tmp_path)
    assert done.returncode != 0 and "--batch-size 3 must be a multiple of the number of processes (2)" in done.stderr
