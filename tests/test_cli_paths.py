"""CLI paths no other test runs: `plan baseline` writing a plan (values checked), the exit codes of
an interrupted, terminated or crashing command (130, 143, 1, and the traceback under
MIXATTN_DEBUG=1), and the optimizer's density sweep (`pareto`)."""


import numpy as np
import pytest
import torch

import mixattn
from mixattn import cli
from mixattn.compress.optimize import optimize, pareto
from mixattn.compress.plan import Plan
from mixattn.models import PRESETS, MixtureLM
from mixattn.train.loop import Terminated


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "tiny"
    mixattn.save(MixtureLM(PRESETS["tiny"].evolve(max_seq_len=4096)), path)
    return path


@pytest.mark.parametrize("kind, density", [("uniform", 0.25), ("uniform", 0.5), ("dense", 0.5)])
def test_plan_baseline_writes_a_plan_of_the_asked_density(ckpt, tmp_path, kind, density, capsys):
    out = tmp_path / "p.json"
    assert cli.main(["plan", "baseline", str(ckpt), "--kind", kind, "--density", str(density), "--length", "2048",
                     "--out", str(out)]) == 0  # fmt: skip
    plan = Plan.load(out)
    cfg = PRESETS["tiny"]
    assert plan.num_layers == cfg.num_layers and plan.num_kv_heads == cfg.num_kv_heads
    want = 1.0 if kind == "dense" else density
    # every head keeps the same number of keys at 2048: count them from the rule, key by key
    rule = plan.layers[0][0]
    kept = sum(1 for j in range(2048) if j < rule.sink or 2047 - j < rule.span(2048))
    assert all(r == rule for layer in plan.layers for r in layer)
    assert abs(kept / 2048 - want) <= 0.01 if kind == "uniform" else kept == 2048
    assert abs(plan.density([2048]) - want) <= 0.01
    assert "density" in capsys.readouterr().out


def _failing(monkeypatch, exc):
    from mixattn.cli import parser

    real = parser.build_parser

    def raise_it(args):
        raise exc

    def build():
        p = real()
        parse = p.parse_args

        def parse_args(argv=None):
            args = parse(argv)
            args.fn = raise_it
            return args

        p.parse_args = parse_args
        return p

    monkeypatch.setattr(cli, "build_parser", build)


@pytest.mark.parametrize(
    "exc, code, text",
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (Terminated(), 143, "terminated (SIGTERM)"),
        (RuntimeError("boom\n  spread over lines"), 1, "internal error: RuntimeError: boom spread over lines"),
        (ValueError("bad  value"), 2, "error: bad value"),
    ],
)
def test_exit_codes_and_one_line_messages(monkeypatch, capsys, exc, code, text):
    monkeypatch.delenv("MIXATTN_DEBUG", raising=False)
    _failing(monkeypatch, exc)
    assert cli.main(["presets"]) == code
    err = capsys.readouterr().err
    assert err.startswith("mixattn presets: ") and text in err and err.count("\n") == 1


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("MIXATTN_DEBUG", "1")
    _failing(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["presets"])


def test_presets_lists_every_preset(capsys):
    assert cli.main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


class _Profile:
    """A profile whose influence favours keeping head 0 dense (it loses most when anything is dropped)."""

    def __init__(self, L=2, H=3, N=512):
        g = torch.Generator().manual_seed(0)
        nb = N // 64
        infl = torch.rand(L, H, nb, nb, generator=g, dtype=torch.float64).tril()
        infl[:, 0] *= 50
        self.lengths, self.influence, self.copy = (N,), {N: infl}, {}


def test_pareto_is_one_optimal_plan_per_density():
    prof = _Profile()
    densities = (0.9, 0.6, 0.35)
    plans = pareto(prof, densities)
    assert len(plans) == 3
    objectives = []
    for d, p in zip(densities, plans):
        one = optimize(prof, d)
        assert p.layers == one.layers  # the sweep is optimize at each budget
        assert p.density([512]) <= d + 1e-9
        objectives.append(p.meta["objective"])
    assert objectives == sorted(objectives)  # a tighter budget never drops less
    assert all(p.layers[layer][0].density(512) >= max(r.density(512) for r in p.layers[layer]) for p in plans
               for layer in range(2))  # head 0 (most influence) is never sparser than the others  # fmt: skip
    assert np.isfinite(objectives).all()


def test_eval_matches_one_baseline_to_each_plan_and_pairs_them(ckpt, tmp_path):
    """`eval --plan A --plan B --baseline uniform:match`: a uniform baseline per plan, each at its
    plan's measured density at every eval length, and the paired tests that compare them."""
    import json

    plans = []
    for d in (0.5, 0.25):
        plans.append(tmp_path / f"p{d}.json")
        assert cli.main(["plan", "baseline", str(ckpt), "--kind", "uniform", "--density", str(d), "--length", "1024",
                         "--out", str(plans[-1])]) == 0  # fmt: skip
    out = tmp_path / "e"
    assert cli.main(["eval", str(ckpt), "--plan", str(plans[0]), "--plan", str(plans[1]), "--baseline", "uniform:match",
                     "--tasks", "passkey", "--lengths", "512,1024", "--depths", "0.5", "--out", str(out)]) == 0  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    for p in ("p0.5", "p0.25"):
        for N in ("512", "1024"):
            assert abs(res["density"][f"uniform @{p}"][N] - res["density"][p][N]) <= 0.01
        assert [p, f"uniform @{p}"] in res["pairs"] and [p, "dense"] in res["pairs"]
