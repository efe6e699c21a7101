"""Bad input on the command line: every case exits non-zero with one line naming what is wrong, no
traceback, and nothing already written is lost. Cases that need a model use a tiny native checkpoint,
so no case loads SmolLM2 (they fail before that)."""

import json
from pathlib import Path

import pytest
import torch

import mixattn
from mixattn.cli import main
from mixattn.compress.plan import Plan
from mixattn.models import PRESETS, MixtureLM
from mixattn.paths import locked


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained run, a tiny checkpoint, plans and corrupt files, built once."""
    root = tmp_path_factory.mktemp("world")
    mp = pytest.MonkeyPatch()
    mp.setenv("MIXATTN_CACHE", str(root / "cache"))
    corpus = root / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 200)
    run = root / "run"
    assert main(["train", "--preset", "tiny", "--corpus", str(corpus), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "16", "--eval-every", "2", "--eval-batches", "1", "--out", str(run)]) == 0  # fmt: skip
    ckpt = root / "ckpt"
    mixattn.save(MixtureLM(PRESETS["tiny"]), ckpt)
    nan = root / "nan"
    model = MixtureLM(PRESETS["tiny"])
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight[0, 0] = float("nan")
    mixattn.save(model, nan)
    truncated = root / "truncated"
    truncated.mkdir()
    for f in (run / "checkpoint").iterdir():
        (truncated / "checkpoint").mkdir(exist_ok=True)
        (truncated / "checkpoint" / f.name).write_bytes(f.read_bytes())
    (truncated / "run.json").write_text((run / "run.json").read_text())
    state = truncated / "checkpoint" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    unknown = root / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"format": "something/9"}))
    (root / "tiny.txt").write_text("eighteen bytes!!\n")
    good = Plan.uniform(2, 2, 0.5, 64, sink=4).to_dict()
    plans = {}
    for name, change in {"model_int": {"model": 5}, "empty_lengths": {"profile_lengths": []},
                         "zero_length": {"profile_lengths": [0]}, "negative_length": {"profile_lengths": [-100]},
                         "bad_beta": {"layers": [{"heads": [{"sink": 0, "alpha": 0, "beta": 2}] * 2}] * 2},
                         "wrong_shape": {"layers": [{"heads": [{"sink": 0, "alpha": 0, "beta": 1.0}]}] * 3,
                                         "model": {"name": "x"}}}.items():  # fmt: skip
        plans[name] = root / f"{name}.json"
        plans[name].write_text(json.dumps({**good, **change}))
    (root / "not_json.json").write_text('{"format": ')
    as_png = root / "plan.png"
    as_png.write_text(json.dumps(good))
    (root / "a_file").write_text("keep me")
    (root / "a_dir").mkdir()
    (root / "a_dir" / "precious.txt").write_text("keep me")
    yield {"root": root, "run": run, "ckpt": ckpt, "nan": nan, "truncated": truncated, "unknown": unknown,
           "corpus": corpus, "plans": plans, "as_png": as_png}  # fmt: skip
    mp.undo()


def _train(w, *extra):
    return ["train", "--preset", "tiny", "--corpus", str(w["corpus"]), "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--eval-batches", "1", *extra]  # fmt: skip


def _cases(w):
    """(argv, text the one-line error must contain)."""
    r, run, ckpt, P = w["root"], str(w["run"]), str(w["ckpt"]), w["plans"]
    out = ["--out", str(r / "new")]
    return [
        # arguments, refused by the parser before any work
        (_train(w, "--steps", "0", *out), "--steps"),
        (_train(w, "--batch-size", "-1", *out), "--batch-size"),
        (_train(w, "--lr", "inf", *out), "--lr"),
        (_train(w, "--lr", "abc", *out), "--lr"),
        (_train(w, "--warmup-steps", "-5", *out), "--warmup-steps"),
        (_train(w, "--seed", "-1", *out), "--seed"),
        (_train(w, "--stop-at", "0", *out), "--stop-at"),
        (_train(w, "--on-nonfinite", "ignore", *out), "--on-nonfinite"),
        (_train(w, "--balance-coef", "-1", *out), "--balance-coef"),
        (["--threads", "0", *_train(w, *out)], "--threads"),
        (["generate", run, "--temperature", "-1"], "--temperature"),
        (["generate", run, "--top-k", "0"], "--top-k"),
        (["generate", run, "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", run, "--seed", "-3"], "--seed"),
        (["convert", ckpt, "--to", "moh", "--active-fraction", "1.5", *out], "--active-fraction"),
        (["convert", ckpt, "--to", "moa", "--top-k", "0", *out], "--top-k"),
        (["plan", "baseline", ckpt, "--length", "-10", "--density", "0.5", "--out", str(r / "p.json")], "--length"),
        (["plan", "baseline", ckpt, "--density", "2", "--out", str(r / "p.json")], "--density"),
        (["plan", "show", str(P["model_int"]), "--lengths", "0,5"], "--lengths"),
        (["compress", ckpt, "--density", "0.5", "--lengths", "0", "--out", str(r / "c.json")], "--lengths"),
        (["compress", ckpt, "--density", "0", "--out", str(r / "c.json")], "--density"),
        (["compress", ckpt, "--density", "0.5", "--max-rules-per-layer", "0", "--out", str(r / "c.json")],
         "--max-rules-per-layer"),
        (["eval", ckpt, "--depths", "2,-1", "--out", str(r / "e")], "--depths"),
        (["eval", ckpt, "--samples", "0", "--out", str(r / "e")], "--samples"),
        (["eval", ckpt, "--baseline", "uniform:abc", "--out", str(r / "e")], "uniform:abc"),
        # config values
        (_train(w, "--set", "hidden_dim=abc", *out), "hidden_dim"),
        (_train(w, "--set", "no_such_key=1", *out), "no_such_key"),
        (_train(w, "--set", "hidden_dim", *out), "hidden_dim"),
        (["train", "--preset", "nope", *out], "nope"),
        (_train(w, "--seq-len", "100000", *out), "max_seq_len"),
        (["generate", run, "--max-new-tokens", "100000"], "max_seq_len"),
        # plans
        (["plan", "show", str(r / "not_json.json")], "not_json.json"),
        (["plan", "show", str(P["model_int"])], "model"),
        (["plan", "show", str(P["empty_lengths"])], "profile_lengths"),
        (["plan", "show", str(P["zero_length"])], "profile_lengths"),
        (["plan", "show", str(P["negative_length"])], "profile_lengths"),
        (["plan", "show", str(P["bad_beta"])], "beta"),
        (["plan", "show", str(r / "missing.json")], "missing.json"),
        (["plan", "show", str(w["as_png"])], "overwrite"),
        (["eval", ckpt, "--plan", str(P["wrong_shape"]), "--tasks", "passkey", "--lengths", "64",
          "--out", str(r / "e")], "KV heads"),
        # files and folders
        (["generate", str(w["nan"])], "non-finite"),
        (["generate", str(w["unknown"])], "unknown checkpoint format"),
        (["generate", str(r / "no_model")], "no_model"),
        (_train(w, "--resume", "--out", str(w["truncated"])), "train_state.pt"),
        (["train", "--resume", "--out", str(r / "a_dir")], "run.json"),
        (["train", "--resume", "--steps", "999", "--out", run], "--steps"),
        (["train", "--resume", "--corpus", "stdlib", "--out", run], "--corpus"),
        (_train(w, "--out", run), "not empty"),
        (_train(w, "--out", str(r / "a_file")), "a_file"),
        (_train(w, "--out", str(r / "a_dir")), "not empty"),
        (["train", "--preset", "tiny", "--corpus", str(r / "tiny.txt"), *out], "tiny.txt"),
        (["train", "--preset", "tiny", "--corpus", str(r / "missing.txt"), *out], "missing.txt"),
        (["train", "--init", str(r / "missing_ckpt"), *out], "missing_ckpt"),
        (["convert", ckpt, "--to", "moa", "--out", str(r / "a_file")], "a_file"),
        (["convert", ckpt, "--to", "moa", "--out", str(r / "a_dir")], "a_dir"),
        (["plan", "baseline", ckpt, "--density", "0.5", "--out", str(r / "a_dir")], "a_dir"),
        (["compare", "../escape=tiny", "--out", str(r / "cmp")], "label"),
        (["compare", "a=tiny", "a=tiny-moe", "--out", str(r / "cmp")], "twice"),
        (["compare", "a_dir=tiny", "--steps", "1", "--out", str(r)], "not made by"),
        (["compress", ckpt, "--density", "0.5", "--out", str(r / "a_dir")], "a_dir"),
        (["eval", ckpt, "--lengths", "64", "--out", str(r / "a_file")], "a_file"),
        (["demo", "--densities", "0.5,abc", "--out", str(r / "d")], "--densities"),
        (["demo", "--densities", "2", "--out", str(r / "d")], "--densities"),
        (["demo", "--eval-lengths", "0", "--out", str(r / "d")], "--eval-lengths"),
        (["demo", "--out", str(r / "a_file")], "a_file"),
    ]


# the cases are counted once with placeholder paths, so each gets its own test id
class _Placeholders(dict):
    def __missing__(self, key):
        return _Placeholders() if key == "plans" else Path("/placeholder")


N_CASES = len(_cases(_Placeholders()))


def test_at_least_forty_bad_invocations(world):
    assert len(_cases(world)) >= 40


@pytest.mark.parametrize("i", range(N_CASES))
def test_bad_invocation_fails_in_one_line(world, i, capsys):
    argv, needle = _cases(world)[i]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code not in (0, 1), (argv, err)  # 1 = internal error: every bad input has a named cause
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert needle in err, (needle, err)


def test_nothing_written_is_lost(world):
    """After every bad invocation, the files that were there are unchanged."""
    r = world["root"]
    assert (r / "a_file").read_text() == "keep me"
    assert (r / "a_dir" / "precious.txt").read_text() == "keep me"
    assert not (r / "new").exists() or not any(p.name != ".mixattn.lock" for p in (r / "new").iterdir())
    assert not (r.parent / "escape").exists()
    assert (world["run"] / "checkpoint" / "model.safetensors").is_file()
    assert Plan.load(world["as_png"]).num_layers == 2  # the plan was not overwritten by its heatmap


def test_a_locked_run_folder_refuses_a_second_writer(world, capsys):
    out = world["root"] / "locked"
    with locked(out):
        assert main(_train(world, "--out", str(out))) == 2
    err = capsys.readouterr().err
    assert "in use" in err and str(out) in err
    assert main(_train(world, "--out", str(out))) == 0  # released: the run goes ahead


def test_nonfinite_training_stops_with_a_clear_error(world, capsys):
    out = world["root"] / "diverge"
    assert main(_train(world, "--lr", "1e30", "--warmup-steps", "0", "--steps", "4", "--eval-every", "4",
                       "--out", str(out))) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "not finite" in err and "--on-nonfinite" in err
    assert not (out / "checkpoint").exists()  # no checkpoint of NaN weights was written
    assert main(_train(world, "--lr", "1e30", "--warmup-steps", "0", "--steps", "4", "--eval-every", "4",
                       "--on-nonfinite", "skip", "--overwrite", "--out", str(out))) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("skipped" in row for row in rows)
    mixattn.load(out)  # every non-finite update was skipped, so the weights stay finite


def test_overwrite_replaces_only_the_run(world):
    out = world["root"] / "over"
    assert main(_train(world, "--out", str(out))) == 0
    (out / "notes.txt").write_text("mine")
    assert main(_train(world, "--steps", "4", "--eval-every", "4", "--overwrite", "--out", str(out))) == 0
    assert (out / "notes.txt").read_text() == "mine"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [4]  # no rows of the replaced run
