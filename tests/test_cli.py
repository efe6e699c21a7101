import json
import subprocess
import sys

import pytest

from mixattn.cli import build_parser, main

COMMANDS = ["train", "generate", "convert", "export", "compress", "eval", "report", "plan", "demo", "compare", "presets"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "mixattn", "--help"], capture_output=True, text=True, check=True)
    assert "train" in out.stdout


def test_errors_are_one_line(capsys, tmp_path):
    assert main(["train", "--preset", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "valid presets" in err and "small-moh" in err
    assert main(["train", "--preset", "tiny", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.txt" in err and err.count("\n") == 0


def test_tiny_end_to_end_train_resume_generate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200)
    out = tmp_path / "run"
    common = ["--corpus", str(corpus), "--steps", "6", "--batch-size", "2", "--seq-len", "32",
              "--eval-every", "3", "--eval-batches", "1", "--out", str(out)]  # fmt: skip
    assert main(["train", "--preset", "tiny-moa", "--stop-at", "3", *common]) == 0
    assert main(["train", "--resume", *common]) == 0
    assert '"step": 6' in capsys.readouterr().out
    assert main(["generate", str(out / "checkpoint"), "--prompt", "To be", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("To be")
    assert main(["generate", str(out), "--prompt", "To be", "--max-new-tokens", "5"]) == 0  # the run folder works too
    assert capsys.readouterr().out == text
    assert main(["train", "--init", str(out / "checkpoint"), "--set", "moa.router.top_k=1", *common[:-1],
                 str(tmp_path / "run2")]) == 0  # fmt: skip


def test_parser_lists_every_command():
    assert set(COMMANDS) <= set(build_parser()._subparsers._group_actions[0].choices)


def test_compare_trains_caches_and_keeps_what_it_did_not_make(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("Now is the winter of our discontent.\n" * 200)
    out = tmp_path / "cmp"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "mine.txt").write_text("keep")
    argv = ["compare", "dense=tiny", "moe=tiny-moe,moe.router.top_k=1", "--corpus", str(corpus), "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--out", str(out)]
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in first] == ["dense", "moe"] and all(r["val_loss"] > 0 for r in first)
    mtime = (out / "dense" / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    assert main(argv) == 0  # same spec and budget: reused, not retrained
    assert (out / "dense" / "checkpoint" / "model.safetensors").stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text()) == first
    assert (out / "notes" / "mine.txt").read_text() == "keep"
    assert (out / "val_loss.png").stat().st_size > 0
