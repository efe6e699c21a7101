"""Sparse plans: the plan file and its rules, apply_plan / remove_plan, density."""

import json
import math

import pytest
import torch

import mixattn
from mixattn.compress import DENSE, HeadRule, Plan, apply_plan, remove_plan
from mixattn.models import PRESETS, MixtureLM


@pytest.mark.parametrize("preset", ["tiny", "tiny-moa", "tiny-moh"])
def test_all_dense_plan_is_a_bit_exact_no_op(preset):
    model = MixtureLM(PRESETS[preset]).eval()
    ids = torch.randint(0, 256, (2, 33))
    before = model(ids).logits
    apply_plan(model, Plan.dense(model.cfg.num_layers, model.cfg.num_kv_heads))
    assert torch.equal(model(ids).logits, before)
    remove_plan(model)
    assert torch.equal(model(ids).logits, before)


def test_apply_plan_refuses_bam_and_other_models():
    with pytest.raises(ValueError, match="one KV cache per expert"):
        apply_plan(MixtureLM(PRESETS["tiny-bam"]), Plan.dense(2, 2))
    with pytest.raises(ValueError, match=r"3 layers x 2 KV heads; the model has 2 x 2"):
        apply_plan(MixtureLM(PRESETS["tiny"]), Plan.dense(3, 2))
    rcmha = MixtureLM(PRESETS["tiny-rcmha"])
    with pytest.raises(ValueError, match="do not apply to RCMHA"):
        apply_plan(rcmha, Plan.dense(2, 2))
    assert all(getattr(layer.attn, "sparse", None) is None for layer in rcmha.layers)  # refused before any change


# ------------------------------------------------------------------ plan file


def test_plan_round_trip_and_semantics(tmp_path):
    plan = Plan.uniform(4, 3, density=0.5, length=2048, sink=64, model_name="m")
    assert abs(plan.density([2048]) - 0.5) < 0.01
    path = plan.save(tmp_path / "p.json")
    again = Plan.load(path)
    assert again == plan and json.loads(path.read_text())["format"] == "mixattn-plan/1"
    r = HeadRule(4, 10.0, 0.25)
    assert r.span(100) == 35 and r.kept(100) == 39 and r.span(3) == 3 and HeadRule(0, 0, 0).span(9) == 1
    assert DENSE.density(777) == 1.0


def test_baselines():
    duo = Plan.duo([[0.9, 0.1], [0.5, 0.2]], density=0.5, length=1024, sink=64, window=128)
    assert duo.meta["retrieval_heads"] == 2 and duo.layers[0][0] == DENSE and duo.layers[1][0] == DENSE
    assert abs(duo.density([1024]) - 0.5) < 0.15
    lw = Plan.layerwise([0.2, 0.8], num_kv_heads=2, length=1000, sink=10)
    assert lw.layers[0][0].density(1000) < lw.layers[1][0].density(1000)


BAD = {
    "alpha": ({"sink": 0, "alpha": -1, "beta": 0.5}, "alpha must be"),
    "nan": ({"sink": 0, "alpha": float("nan"), "beta": 0.5}, "alpha must be"),
    "beta": ({"sink": 0, "alpha": 1, "beta": 1.5}, r"beta must be in \[0, 1\]"),
    "sink": ({"sink": -3, "alpha": 1, "beta": 0.5}, "sink must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rules_are_clear_errors(case, tmp_path):
    data = Plan.dense(2, 2).to_dict()
    data["layers"][1]["heads"][0] = BAD[case][0]
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="layer 1 head 0: " + BAD[case][1]):
        Plan.load(tmp_path / "p.json")


def test_bad_files(tmp_path):
    data = Plan.dense(2, 2).to_dict()
    (tmp_path / "fmt.json").write_text(json.dumps({**data, "format": "moa/0"}))
    with pytest.raises(ValueError, match="unknown plan format 'moa/0'"):
        Plan.load(tmp_path / "fmt.json")
    (tmp_path / "cut.json").write_text(json.dumps(data)[:50])
    with pytest.raises(ValueError, match="cut.json: not valid JSON"):
        Plan.load(tmp_path / "cut.json")
    with pytest.raises(FileNotFoundError, match="no such plan"):
        Plan.load(tmp_path / "missing.json")


def test_failed_save_leaves_the_old_plan_intact(tmp_path):
    path = Plan.dense(2, 2).save(tmp_path / "p.json")
    before = path.read_text()
    bad = Plan(Plan.dense(2, 2).layers, meta={"x": object()})  # not JSON-serialisable
    with pytest.raises(TypeError):
        bad.save(path)
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


def test_summary_and_plot(tmp_path):
    plan = Plan.duo([[0.9, 0.1, 0.3]] * 4, density=0.4, length=2048)
    text = plan.summary()
    assert "4 layers x 3 KV heads" in text and "distinct rules" in text
    png = plan.plot(tmp_path / "plan.png")
    assert png.stat().st_size > 1000
    assert mixattn.Plan is Plan


# ------------------------------------------------------------------ SparseSpec: the span rule's one home


def test_sparse_spec_spans_density_and_kernel_choice():
    """span(N) = min(N, max(1, floor(alpha + beta N))), written out; dense at N iff sink + span >= N;
    "auto" takes blocked when a gradient is needed, and only sdpa below one flex block."""
    from mixattn.kernels.sparse_auto import choose
    from mixattn.layers.sparse import SparseSpec

    rules = [(0, 0.0, 0.0), (3, 10.0, 0.25), (0, 5.5, 1.0), (2, 0.4, 0.3), (7, 100.0, 0.0)]
    spec = SparseSpec(*map(tuple, zip(*rules)))
    for N in (1, 4, 17, 40, 100, 1000):
        want = []
        for _, alpha, beta in rules:
            span = math.floor(alpha + beta * N)
            want.append(N if span > N else 1 if span < 1 else span)
        assert spec.spans(N).tolist() == want, N
        assert spec.is_dense_at(N) == all(s + w >= N for (s, _, _), w in zip(rules, want))
    assert spec.spans(40).tolist() == [1, 20, 40, 12, 40]  # floors and both clamps, by hand
    assert SparseSpec((3,), (10.0,), (0.25,)).is_dense_at(17) and not SparseSpec((3,), (10.0,), (0.25,)).is_dense_at(18)
    q = torch.zeros(1, 2, 8, 4, requires_grad=True)
    k = torch.zeros(1, 2, 8, 4)
    assert choose(q, k, k, spec.sinks()[:2], spec.spans(8)[:2]) == "blocked"
    with torch.no_grad():  # inference on a one-block sequence: only the fused-SDPA kernel is a candidate
        assert choose(q, k, k, spec.sinks()[:2], spec.spans(8)[:2]) == "sdpa"


def test_plan_density_is_the_mean_kept_fraction_counted_key_by_key():
    """Density from a loop over keys: at length N a head keeps the keys the last query sees,
    {j < N : j < sink or N - 1 - j < span(N)}, with span(N) = min(N, max(1, floor(alpha + beta N)));
    the plan's density is the mean of kept / N over layers, KV heads and lengths."""
    rules = [
        (HeadRule(0, 0.0, 0.0), HeadRule(4, 10.0, 0.25), HeadRule(60, 0.0, 0.0)),  # sink beyond short N
        (HeadRule(5, 30.0, 0.9), HeadRule(0, 0.0, 1.0), HeadRule(2, 3.0, 0.1)),  # sink + span > N
    ]
    plan = Plan(tuple(rules))
    lengths = [16, 50, 333]

    def kept(rule, N):
        span = min(N, max(1, math.floor(rule.alpha + rule.beta * N)))
        return sum(1 for j in range(N) if j < rule.sink or N - 1 - j < span)

    want = sum(kept(r, N) / N for N in lengths for layer in rules for r in layer) / (2 * 3 * len(lengths))
    n = 2 * 3 * len(lengths)  # a float64 mean of n fractions <= 1: rounding <= (n + 1) eps
    assert abs(plan.density(lengths) - want) <= (n + 1) * torch.finfo(torch.float64).eps
    for N in lengths:
        assert [r.kept(N) for layer in rules for r in layer] == [kept(r, N) for layer in rules for r in layer]
    assert kept(rules[1][0], 50) == 50 and kept(rules[0][2], 16) == 16  # the clamps are exercised
