"""The profile-ranked DuoAttention baseline (duo-gradient) and `eval --only-baselines`."""

import json

import pytest

import mixattn
from mixattn.cli import main
from mixattn.compress import optimize
from mixattn.compress.pipeline import baseline, profile_for
from mixattn.compress.plan import DENSE, HeadRule, Plan
from mixattn.compress.profile import LOCAL, SINK

from .test_search import _saved_tiny


@pytest.fixture
def compressed(tmp_path, monkeypatch):
    """(model folder, plan path) of a tiny compress run whose profile sits in the test's cache."""
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    src = _saved_tiny(tmp_path)
    plan_path = tmp_path / "plan.json"
    assert main(["compress", str(src), "--density", "0.5", "--lengths", "640", "--samples", "1",
                 "--out", str(plan_path)]) == 0  # fmt: skip
    return src, plan_path


def test_duo_gradient_keeps_full_the_heads_a_streaming_rule_hurts_most(compressed):
    src, plan_path = compressed
    prof = profile_for(src, Plan.load(plan_path))
    loss = optimize.loss_matrix(prof, [HeadRule(SINK, float(LOCAL), 0.0)])[:, 0]
    plan = baseline(src, "duo-gradient", 0.5, 1024, profile=prof)
    full = [r == DENSE for r in plan.rules()]
    assert 0 < sum(full) < len(full)
    assert min(x for x, f in zip(loss, full) if f) >= max(x for x, f in zip(loss, full) if not f)
    assert plan.meta["method"] == "duo-gradient"


def test_eval_only_baselines_scores_the_same_rows_as_a_full_run(compressed, tmp_path):
    src, plan_path = compressed
    args = ["eval", str(src), "--plan", str(plan_path), "--baseline", "duo-gradient:match", "--baseline",
            "uniform:match", "--tasks", "passkey,ppl", "--lengths", "768,1024", "--depths", "0.5"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "all")]) == 0
    assert main([*args, "--only-baselines", "--no-dense", "--out", str(tmp_path / "only")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("all", "only"))
    assert set(b["density"]) == {"duo-gradient @plan", "uniform @plan"}
    assert set(a["density"]) == {"dense", "plan", "duo-gradient @plan", "uniform @plan"}
    for N in ("768", "1024"):  # duo moves in whole heads: half of one of the tiny model's 4 KV heads' share
        assert abs(a["density"]["duo-gradient @plan"][N] - a["density"]["plan"][N]) <= 1 / 8
    rows = lambda r: [{k: x[k] for k in ("method", "depth", "seed", "generated")} for x in r if x["method"] in b["density"]]  # noqa: E731
    assert rows(a["retrieval"]) == rows(b["retrieval"]) and rows(b["retrieval"])
    assert a["ppl"]["duo-gradient @plan"] == b["ppl"]["duo-gradient @plan"]


def test_duo_gradient_errors_name_what_is_missing(compressed, tmp_path, monkeypatch, capsys):
    src, plan_path = compressed
    run = ["eval", str(src), "--tasks", "passkey", "--lengths", "768", "--out", str(tmp_path / "e")]
    assert main([*run, "--plan", str(plan_path), "--baseline", "duo-gradient:0.5"]) == 2
    assert "use duo-gradient:match" in capsys.readouterr().err
    assert main([*run, "--plan", str(plan_path), "--baseline", "streaming:match"]) == 2
    assert "unknown kind 'streaming'" in capsys.readouterr().err
    assert main([*run, "--baseline", "uniform:0.5", "--only-baselines", "--no-dense"]) == 0  # no plan needed
    bare = tmp_path / "bare.json"
    cfg = mixattn.load(src).cfg
    Plan.uniform(cfg.num_layers, cfg.num_kv_heads, 0.5, 768).save(bare)
    assert main([*run, "--plan", str(bare), "--baseline", "duo-gradient:match"]) == 2
    assert "does not record its calibration" in capsys.readouterr().err
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "other_cache"))  # the profile is not on this machine
    assert main([*run, "--plan", str(plan_path), "--baseline", "duo-gradient:match"]) == 2
    err = capsys.readouterr().err
    assert "no cached profile" in err and "--lengths 640 --samples 1" in err
    with pytest.raises(ValueError, match="needs the gradient profile"):
        baseline(src, "duo-gradient", 0.5, 768)


def test_compress_cli_reuses_the_cached_profile_unless_told_to_rebuild(compressed, tmp_path, monkeypatch):
    from mixattn.compress import calibration, profile

    src, plan_path = compressed  # the fixture's run built calibration and profile once
    built = {"calibration": 0, "profile": 0}
    real_build, real_run = calibration.build, profile.run

    def build(*a, **k):
        built["calibration"] += 1
        return real_build(*a, **k)

    def run(model, samples, lengths, path=None, resume=False, progress=True):
        built["profile"] += not resume
        return real_run(model, samples, lengths, path, resume, progress)

    monkeypatch.setattr(calibration, "build", build)
    monkeypatch.setattr(profile, "run", run)
    args = ["compress", str(src), "--density", "0.25", "--lengths", "640", "--samples", "1"]
    assert main([*args, "--out", str(tmp_path / "again.json")]) == 0
    assert built == {"calibration": 0, "profile": 0}
    assert main([*args, "--rebuild", "--out", str(tmp_path / "fresh.json")]) == 0
    assert built == {"calibration": 1, "profile": 1}
