"""Plan interchange with MoA's moa_alpha_beta.json and DuoAttention's full_attention_heads.tsv +
config.json: GQA reduction, Duo's quantile threshold, round trips, errors, the CLI and the shipped
SmolLM2-shaped example files."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

import mixattn
from mixattn.cli import main
from mixattn.compress import interchange as ix
from mixattn.compress.plan import DENSE, HeadRule, Plan

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plans" / "smollm2"
LENGTHS = (128, 1024, 4096, 16384)


def _random_plan(L, K, sink=64, seed=0, stream=None):
    rng = random.Random(seed)
    if stream is not None:  # Duo-shaped: full heads and one fixed streaming rule
        return Plan(tuple(tuple(DENSE if rng.random() < 0.4 else stream for _ in range(K)) for _ in range(L)))
    rule = lambda: DENSE if rng.random() < 0.2 else HeadRule(sink, float(rng.choice([0, 64, 300])), rng.random() / 2)  # noqa: E731
    return Plan(tuple(tuple(rule() for _ in range(K)) for _ in range(L)))


# ---------------------------------------------------------------- MoA


def test_moa_gqa_reduction_by_max_and_mean():
    data = {"alphas": [[100, 300, 50, 50]], "betas": [[0.5, 0.1, 0.2, 0.2]]}  # 4 query heads, 2 KV heads
    top = ix.moa_to_plan(data, 1, 4, 2, gqa="max")
    assert top.layers == ((HeadRule(64, 300.0, 0.5), HeadRule(64, 50.0, 0.2)),)
    assert "max alpha and beta of each group of 2 query heads" in top.meta["note"]
    mean = ix.moa_to_plan(data, 1, 4, 2, gqa="mean")
    assert mean.layers == ((HeadRule(64, 200.0, 0.3), HeadRule(64, 50.0, 0.2)),)
    per_kv = ix.moa_to_plan({"alphas": [[1, 2]], "betas": [[0.1, 1.0]]}, 1, 4, 2)  # already one rule per KV head
    assert per_kv.layers == ((HeadRule(64, 1.0, 0.1), DENSE),)


def test_moa_max_reduction_lets_every_query_head_see_at_least_its_moa_span():
    data = json.loads((EXAMPLES / "moa_alpha_beta.json").read_text())
    plan = ix.load_moa(EXAMPLES / "moa_alpha_beta.json", 30, 9, 3)  # SmolLM2: 9 query heads, 3 KV heads
    assert (plan.num_layers, plan.num_kv_heads) == (30, 3)
    for i, (a_row, b_row) in enumerate(zip(data["alphas"], data["betas"])):
        for h, (a, b) in enumerate(zip(a_row, b_row)):
            kv = plan.layers[i][h // 3]
            for N in LENGTHS:
                assert kv.kept(N) >= HeadRule(64, a, b).kept(N)
    mean = ix.load_moa(EXAMPLES / "moa_alpha_beta.json", 30, 9, 3, gqa="mean")
    assert mean.density() < plan.density()


@pytest.mark.parametrize("gqa", ["max", "mean"])
def test_moa_round_trip(gqa):
    plan = _random_plan(5, 3, seed=1)
    data = ix.plan_to_moa(plan, num_heads=9)
    assert len(data["alphas"]) == 5 and all(len(r) == 9 for r in data["alphas"] + data["betas"])
    assert ix.moa_to_plan(json.loads(json.dumps(data)), 5, 9, 3, gqa=gqa).layers == plan.layers


def test_moa_errors_name_the_key_and_head(tmp_path):
    good = {"alphas": [[1, 2, 3, 4]], "betas": [[0.1, 0.2, 0.3, 0.4]]}
    cases = [({"alphas": good["alphas"]}, "'betas' must be a non-empty list"),
             ({**good, "betas": [[0.1, 0.2, 1.5, 0.4]]}, r"betas\[0\]\[2\] must be a number in \[0.0, 1.0\]"),
             ({**good, "alphas": [[1, 2, -3, 4]]}, r"alphas\[0\]\[2\]"),
             ({**good, "alphas": [[1, 2, 3]]}, "layer 0 has 3 alphas but 4 betas"),
             ({"alphas": [[1] * 3], "betas": [[0.1] * 3]}, "lists 3 heads; the model has 4 query heads"),
             ({"alphas": good["alphas"] * 2, "betas": good["betas"] * 2}, "lists 2 layers; the model has 1")]  # fmt: skip
    for data, match in cases:
        with pytest.raises(ValueError, match=match):
            ix.moa_to_plan(data, 1, 4, 2)
    with pytest.raises(ValueError, match="gqa='min'"):
        ix.moa_to_plan(good, 1, 4, 2, gqa="min")
    with pytest.raises(FileNotFoundError, match="no such MoA plan"):
        ix.load_moa(tmp_path / "missing.json", 1, 4, 2)
    bad_sink = Plan(((HeadRule(64, 1.0, 0.1), HeadRule(16, 8.0, 0.0)),))
    with pytest.raises(ValueError, match="layer 0 KV head 1: sink 16, but MoA's format fixes the sink at 64"):
        ix.plan_to_moa(bad_sink, 4)


# ---------------------------------------------------------------- DuoAttention


def test_duo_threshold_is_the_sparsity_quantile_of_the_gates():
    gates = ix.read_duo_gates(EXAMPLES / "duo" / "full_attention_heads.tsv")
    assert (len(gates), len(gates[0])) == (30, 3)
    flat = np.array(gates)
    for S in (0.1, 0.25, 0.5, 0.9):
        full = np.array(ix.duo_full_heads(gates, S))
        assert (full == (flat >= np.quantile(flat, S))).all()
    assert all(map(all, ix.duo_full_heads(gates, 0.0))) and not any(map(any, ix.duo_full_heads(gates, 1.0)))
    assert ix.duo_full_heads([[0.1, 0.2, 0.3]], 0.5) == [[False, True, True]]  # a gate equal to the threshold stays full
    plan = ix.load_duo(EXAMPLES / "duo" / "full_attention_heads.tsv", EXAMPLES / "duo" / "config.json", 0.5, 30, 3)
    assert set(plan.rules()) == {DENSE, HeadRule(64, 256.0, 0.0)} and plan.meta["retrieval_heads"] == 45


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_duo_round_trip(seed, tmp_path):
    plan = _random_plan(6, 2, seed=seed, stream=HeadRule(32, 128.0, 0.0))
    if seed == 2:
        plan = Plan.dense(6, 2)  # no streaming head: Duo's defaults are written, every head stays full
    tsv, conf = ix.save_duo(plan, tmp_path / "duo")
    n_stream = sum(r != DENSE for r in plan.rules())
    back = ix.load_duo(tsv, conf, n_stream / len(plan.rules()), 6, 2)
    assert back.layers == plan.layers


def test_duo_errors(tmp_path):
    tsv, conf = tmp_path / "g.tsv", tmp_path / "config.json"
    conf.write_text(json.dumps({"sink_size": 64, "recent_size": 256}))
    for text, match in [("0.1\t0.2\n0.3\tx\n", "line 2 is not tab-separated numbers"),
                        ("0.1\t0.2\n0.3\n", "same number of KV heads"),
                        ("0.1\t1.2\n", r"gates\[0\]\[1\] must be a number in \[0.0, 1.0\]")]:  # fmt: skip
        tsv.write_text(text)
        with pytest.raises(ValueError, match=match):
            ix.load_duo(tsv, conf, 0.5)
    tsv.write_text("0.1\t0.2\n")
    with pytest.raises(ValueError, match="1 layers x 2 KV heads; the model has 2 x 2"):
        ix.load_duo(tsv, conf, 0.5, 2, 2)
    conf.write_text(json.dumps({"sink_size": 64}))
    with pytest.raises(ValueError, match="'recent_size' must be an integer >= 1"):
        ix.load_duo(tsv, conf, 0.5)
    elastic = Plan(((HeadRule(64, 0.0, 0.25), DENSE),))
    with pytest.raises(ValueError, match="layer 0 KV head 0: window alpha 0.0 \\+ beta 0.25 N"):
        ix.plan_to_duo(elastic)
    two = Plan(((HeadRule(64, 256.0, 0.0), HeadRule(64, 128.0, 0.0)),))
    with pytest.raises(ValueError, match="layer 0 KV head 1: sink 64 \\+ window 128 differs"):
        ix.plan_to_duo(two)


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer model with 4 query and 2 KV heads, saved as a mixattn checkpoint."""
    d = tmp_path_factory.mktemp("tiny") / "ckpt"
    model = mixattn.MixtureLM(mixattn.from_name("tiny"))
    mixattn.save(model, d)
    return d, model.cfg


def test_cli_import_export_round_trip(tiny_model, tmp_path, capsys):
    ckpt, cfg = tiny_model
    L, H, K = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads
    moa = {"alphas": [[64.0 * (h + 1) for h in range(H)] for _ in range(L)],
           "betas": [[0.1 * (h % 3) for h in range(H)] for _ in range(L)]}  # fmt: skip
    (tmp_path / "moa_alpha_beta.json").write_text(json.dumps(moa))
    out = tmp_path / "moa.json"
    assert main(["plan", "import", "moa", str(tmp_path / "moa_alpha_beta.json"), "--model", str(ckpt), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reduced to one per KV head" in printed and "--gqa mean" in printed
    plan = Plan.load(out)
    assert plan.layers == ix.moa_to_plan(moa, L, H, K).layers and plan.model_name == str(ckpt)
    assert main(["plan", "export", "moa", str(out), "--model", str(ckpt), "--out", str(tmp_path / "back.json")]) == 0
    again = ix.load_moa(tmp_path / "back.json", L, H, K)
    assert again.layers == plan.layers

    gates = "\n".join("\t".join(str((i + h) % 3 / 2) for h in range(K)) for i in range(L)) + "\n"
    (tmp_path / "g.tsv").write_text(gates)
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 4, "recent_size": 16}))
    duo = tmp_path / "duo.json"
    args = ["plan", "import", "duo", str(tmp_path / "g.tsv"), "--config", str(tmp_path / "config.json")]
    assert main([*args, "--sparsity", "0.5", "--model", str(ckpt), "--out", str(duo)]) == 0
    assert main(["plan", "export", "duo", str(duo), "--out", str(tmp_path / "duo_out")]) == 0
    assert json.loads((tmp_path / "duo_out" / "config.json").read_text()) == {"sink_size": 4, "recent_size": 16}
    d = Plan.load(duo)
    n_stream = sum(r != DENSE for r in d.rules())
    back = ix.load_duo(tmp_path / "duo_out" / "full_attention_heads.tsv", tmp_path / "duo_out" / "config.json",
                       n_stream / len(d.rules()))  # fmt: skip
    assert back.layers == d.layers


def test_cli_import_export_errors_are_one_line(tiny_model, tmp_path, capsys):
    ckpt, _ = tiny_model
    f = str(EXAMPLES / "moa_alpha_beta.json")
    cases = [(["plan", "import", "gguf", f, "--out", "x"], "must be moa or duo"),
             (["plan", "import", "moa", "--out", "x"], "needs FILE"),
             (["plan", "import", "moa", f, "--out", "x"], "needs --model"),
             (["plan", "import", "moa", f, "--model", str(ckpt), "--out", str(tmp_path / "p.json")],
              "lists 30 layers; the model has 2"),
             (["plan", "import", "duo", f, "--model", str(ckpt), "--out", "x"], "needs --config"),
             (["plan", "import", "duo", f, "--config", f, "--sparsity", "1.5", "--model", str(ckpt), "--out", "x"],
              "--sparsity must be in"),
             (["plan", "import", "moa", f, "--sparsity", "0.5", "--model", str(ckpt), "--out", "x"], "are for plan import duo"),
             (["plan", "show", f, "extra.json"], "takes one plan file")]  # fmt: skip
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, (argv, err)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.slow
def test_shipped_example_files_import_for_smollm2(tmp_path):
    for fmt, extra in (("moa", []), ("duo", ["--config", str(EXAMPLES / "duo" / "config.json"), "--sparsity", "0.5"])):
        src = EXAMPLES / ("moa_alpha_beta.json" if fmt == "moa" else "duo/full_attention_heads.tsv")
        out = tmp_path / f"{fmt}.json"
        assert main(["plan", "import", fmt, str(src), *extra, "--model", "smollm2-135m", "--out", str(out)]) == 0
        plan = Plan.load(out)
        plan.validate(mixattn.load("smollm2-135m").cfg)
        assert 0.3 < plan.density() < 0.9
