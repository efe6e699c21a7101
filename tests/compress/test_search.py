"""Plan search: the profiler's first-order estimate, the MILP, the pipeline and its errors."""

import json

import numpy as np
import pytest
import torch

import mixattn
import mixattn.layers.attention as attention_mod
from mixattn.cli import main
from mixattn.compress import profile as profiling
from mixattn.compress.calibration import CalibSample
from mixattn.compress.optimize import optimize, solve
from mixattn.compress.plan import Plan
from mixattn.models import PRESETS, MixtureLM


def _tiny_double():
    torch.manual_seed(0)
    return MixtureLM(PRESETS["tiny"].evolve(max_seq_len=512)).double().eval()


def _sample(T=40):
    ids = torch.randint(0, 256, (T,), generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(T, dtype=torch.bool)
    mask[-6:-1] = True
    return ids, mask


def _loss(model, ids, mask):
    logits = model(ids[None]).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits[mask[:-1]], ids[1:][mask[:-1]])


def _with_score_bias(monkeypatch, layer, head, i, j, bias):
    """Add ``bias`` to one attention score (layer, head, i, j); softmax then renormalises the row."""
    calls = {"n": 0}
    real = attention_mod.attend

    def attend(q, k, v, ctx, spec):
        n = calls["n"]
        calls["n"] += 1
        if n != layer:
            return real(q, k, v, ctx, spec)
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        s = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), float("-inf"))
        s[0, head, i, j] = s[0, head, i, j] + bias
        return torch.softmax(s, -1) @ v

    monkeypatch.setattr(attention_mod, "attend", attend)


def test_influence_matches_finite_differences(monkeypatch):
    model = _tiny_double()
    ids, mask = _sample()
    with profiling.capture(profiling.attention_modules(model)) as caps:
        _loss(model, ids, mask).backward()
    L, head, i, j = 1, 1, 30, 12
    q, k, v, o = caps[L]
    G = model.cfg.num_heads // model.cfg.num_kv_heads
    A = profiling._attention_matrix(q[0, head], k[0, head // G])
    dl = profiling.influence(A, o.grad[0, head] @ v[0, head // G].T)
    base = float(_loss(model, ids, mask))
    eps = 1e-4  # partial masking: score + log(1 - eps) scales A[i, j] by (1 - eps) and renormalises
    losses = {}
    with torch.no_grad():
        for e in (eps, -eps):
            _with_score_bias(monkeypatch, L, head, i, j, float(np.log1p(-e)))
            losses[e] = float(_loss(model, ids, mask))
        _with_score_bias(monkeypatch, L, head, i, j, float("-inf"))
        full = float(_loss(model, ids, mask)) - base
    derivative = (losses[eps] - losses[-eps]) / (2 * eps)
    # d L / d eps at 0 = A (S - G) = dL_formula * (1 - A): exact; full masking: first order
    assert derivative == pytest.approx(float(dl[i, j] * (1 - A[i, j])), rel=1e-4, abs=1e-12)
    assert full == pytest.approx(float(dl[i, j]), rel=0.2, abs=1e-6)


def test_optimizer_respects_budgets_and_finds_known_optimum():
    # 3 heads, rules: 0 dense (d=1), 1 half (d=.5), 2 tight (d=.1); head 0 loses a lot without dense
    loss = np.array([[0.0, 5.0, 9.0], [0.0, 0.1, 0.2], [0.0, 0.3, 3.0]])
    dens = np.array([[1.0, 1.0], [0.5, 0.5], [0.1, 0.15]])  # densities at two profile lengths
    # budget 0.55 (total 1.65): dense + tight + half uses 1.6 and 1.65 -> loss 0.5 is the optimum
    assert list(solve(loss, dens, budget=0.55)) == [0, 2, 1]
    # budget 0.5 (total 1.5): that no longer fits at either length; best is dense + tight + tight (3.2)
    choice = solve(loss, dens, budget=0.5)
    assert list(choice) == [0, 2, 2]
    assert all(dens[choice, n].mean() <= 0.5 + 1e-9 for n in range(2))
    with pytest.raises(ValueError, match="cannot be met"):
        solve(loss, dens, budget=0.05)


def test_two_rules_per_layer_constraint_binds():
    loss = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])  # each head wants its own rule
    dens = np.array([[0.3], [0.3], [0.3]])
    free = solve(loss, dens, 0.5)
    assert len(set(free)) == 3
    bound = solve(loss, dens, 0.5, layer_of=np.zeros(3, dtype=int), max_rules_per_layer=2)
    assert len(set(bound)) == 2 and loss[np.arange(3), bound].sum() == 1.0


def _saved_tiny(tmp_path):
    torch.manual_seed(0)
    model = MixtureLM(PRESETS["tiny"].evolve(max_seq_len=1024))
    mixattn.save(model, tmp_path / "tiny")
    return tmp_path / "tiny"


def test_compress_cli_end_to_end_and_eval_outputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    src = _saved_tiny(tmp_path)
    plan_path = tmp_path / "plan.json"
    assert main(["compress", str(src), "--density", "0.5", "--lengths", "640,768", "--samples", "2",
                 "--validate-length", "1024", "--validate-samples", "1", "--save-candidates",
                 "--ppl-windows", "2", "--out", str(plan_path)]) == 0  # fmt: skip
    plan = Plan.load(plan_path)
    saved = {p.name.split(".", 1)[1].removesuffix(".json"): Plan.load(p) for p in tmp_path.glob("plan.*.json")}
    assert set(saved) == set(plan.meta["validation"]["losses"]) and saved[plan.meta["candidate"]] == plan
    plan.validate(mixattn.load(src).cfg)
    assert all(plan.density([N]) <= 0.5 + 1e-9 for N in (640, 768, 1024))
    v = plan.meta["validation"]
    assert set(v["losses"]) >= {"milp", "milp-2-rules"} and set(v["ppl"]) == set(v["losses"])
    assert v["ppl_length"] == 1024  # the perplexity guard is on by default, at the validation length
    assert v["ppl"][plan.meta["candidate"]] <= 1.05 or min(v["ppl"].values()) == v["ppl"][plan.meta["candidate"]]
    assert "ppl" in capsys.readouterr().out
    assert plan_path.with_suffix(".png").is_file()
    out = tmp_path / "eval"
    assert main(["eval", str(src), "--plan", str(plan_path), "--baseline", "uniform:0.5", "--baseline", "uniform:match",
                 "--baseline", "duo:match",
                 "--tasks", "passkey,multikey,ppl,speed", "--lengths", "768,1024", "--depths", "0.5",
                 "--out", str(out)]) == 0  # fmt: skip
    assert {"results.json", "results.md", "accuracy_vs_length.png", "depth_length_heatmap.png",
            "memory_speed.png"} <= {p.name for p in out.iterdir()}  # fmt: skip
    res = json.loads((out / "results.json").read_text())
    assert set(res["speed"]) == {"dense", "plan", "uniform 0.5", "uniform @plan", "duo @plan"}
    for N in ("768", "1024"):  # matched baseline: the plan's density at every eval length, within 0.01
        assert abs(res["density"]["uniform @plan"][N] - res["density"]["plan"][N]) <= 0.01
        # duo moves in whole heads: the tiny model has 4 KV heads, so half a head's share is 1/8
        assert abs(res["density"]["duo @plan"][N] - res["density"]["plan"][N]) <= 1 / 8
    assert len(res["retrieval"]) == 5 * 2 * 2 and all("generated" in r for r in res["retrieval"])
    assert "Wilson" in (out / "results.md").read_text()
    # the plan was searched at 0.5: its target line, against its own matched uniform row
    assert res["verdicts"][0].startswith("density 0.5: plan ") and "below uniform at" in res["verdicts"][0]
    assert res["budgets"] == {"plan": 0.5}  # what `mixattn report` reads to write the same lines
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "results.json").read_text())["verdicts"] == res["verdicts"]
    assert res["speed"]["uniform 0.5"]["kv_bytes"] < res["speed"]["dense"]["kv_bytes"]
    assert main(["plan", "show", str(plan_path)]) == 0
    assert "distinct rules" in capsys.readouterr().out


def test_compress_bad_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    src = _saved_tiny(tmp_path)
    assert main(["compress", str(src), "--density", "0.01", "--lengths", "128", "--out", str(tmp_path / "p.json")]) == 2
    assert "cannot be met" in capsys.readouterr().err and not (tmp_path / "p.json").exists()
    assert main(["compress", str(src), "--density", "0.5", "--lengths", "4096", "--out", str(tmp_path / "p.json")]) == 2
    assert "max_seq_len 1024" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    from mixattn.compress.calibration import build

    with pytest.raises(ValueError, match="empty"):
        build(mixattn.load(src), mixattn.ByteTokenizer(), [str(tmp_path / "empty")], (128,), 1)


def test_interrupted_profile_resumes_to_the_same_result(tmp_path):
    model = _tiny_double().float()
    samples = []
    for s in range(3):
        ids = torch.randint(0, 256, (128,), generator=torch.Generator().manual_seed(s))
        mask = torch.zeros(128, dtype=torch.bool)
        mask[-5:-1] = True
        samples.append(CalibSample(ids, mask, 128))
    whole = profiling.run(model, samples, (128,), progress=False)
    profiling.run(model, samples[:2], (128,), tmp_path / "p.pt", progress=False)  # "interrupted" after 2
    resumed = profiling.run(model, samples, (128,), tmp_path / "p.pt", resume=True, progress=False)
    assert resumed.done == 3 and resumed.counts[128] == 3
    torch.testing.assert_close(resumed.influence[128], whole.influence[128])
    plan = optimize(resumed, 0.6)
    assert plan.density([128]) <= 0.6 + 1e-9


@pytest.mark.parametrize("kw, msg", [
    ({"density": 0.0}, "density must be in"), ({"density": 1.5}, "density must be in"),
    ({"lengths": (0, 1024)}, "lengths must be positive"), ({"lengths": ()}, "lengths must be positive"),
    ({"max_rules_per_layer": 0}, "max_rules_per_layer must be"), ({"samples": 0}, "samples must be"),
    ({"validate_length": -5}, "validate_length must be"), ({"validate_length": 2048, "ppl_length": 1}, "ppl_length must"),
    ({"ppl_length": 2048}, "needs validate_length"),
    ({"validate_length": 2048, "ppl_length": 2048, "ppl_tolerance": -0.1}, "ppl_tolerance >= 0"),
])  # fmt: skip
def test_compress_validates_arguments_before_loading_anything(tmp_path, kw, msg):
    from mixattn.compress.pipeline import compress

    args = {"density": 0.5, "lengths": (1024,), **kw}
    with pytest.raises(ValueError, match=msg):  # a missing model would raise FileNotFoundError if loaded first
        compress(tmp_path / "no-such-model", args.pop("density"), work_dir=tmp_path / "w", **args)
    assert not (tmp_path / "w").exists()


def test_compress_checks_max_seq_len_from_the_config_only(tmp_path, monkeypatch):
    from mixattn.compress import pipeline

    src = _saved_tiny(tmp_path)
    monkeypatch.setattr(pipeline, "load_model", lambda s: pytest.fail("loaded the model before validating"))
    with pytest.raises(ValueError, match="max_seq_len 1024"):
        pipeline.compress(src, 0.5, lengths=(512,), validate_length=4096, work_dir=tmp_path / "w")


def test_profile_cache_is_keyed_by_content_not_path(tmp_path):
    import shutil

    from mixattn.compress.pipeline import work_dir_for

    src = _saved_tiny(tmp_path)
    copy = tmp_path / "elsewhere" / "same"
    shutil.copytree(src, copy)
    key = work_dir_for(src, (1024,), 16, 0, ("shakespeare",))
    assert work_dir_for(copy, (1024,), 16, 0, ("shakespeare",)) == key
    model = mixattn.load(copy)
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight.add_(1e-3) if hasattr(model.layers[0].attn, "q_proj") else \
            next(model.parameters()).add_(1e-3)  # fmt: skip
    mixattn.save(model, copy)
    assert work_dir_for(copy, (1024,), 16, 0, ("shakespeare",)) != key
    assert work_dir_for(src, (1024, 2048), 16, 0, ("shakespeare",)) != key


def test_calibration_keeps_the_models_answer_only_when_it_is_right():
    from mixattn.compress.calibration import answer
    from mixattn.data import tasks

    from ..data.helpers import byte_tok, haystack

    tok = byte_tok()
    s = tasks.make("multikey", tok, haystack(tok), 1000, 0.5, seed=3)

    class Says:
        def __init__(self, text):
            self.ids = tok.encode(text)

        def generate(self, ids, n, stop_tokens=()):
            return torch.cat([ids, torch.tensor([self.ids[:n]])], 1)

    ids, start, own = answer(Says(" " + s.answers[0] + "."), tok, s, 16)
    assert own and tok.decode(ids[start:].tolist()) == " " + s.answers[0] + "."
    ids, start, own = answer(Says(" " + s.meta["distractors"][0] + "."), tok, s, 16)  # a distractor: use gold
    assert not own and ids.tolist() == s.context_ids + s.answer_ids and start == s.length


@pytest.mark.slow  # about 35 s of CPU: compiles the flex kernel for several plans
def test_demo_pipeline_on_a_tiny_model(tmp_path, monkeypatch):
    from mixattn import demo

    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    src = _saved_tiny(tmp_path)
    grid = {"densities": (0.5,), "lengths": (640,), "samples": 1, "validate_length": 768, "validate_samples": 1,
            "eval_lengths": (768, 1024), "tasks": ("passkey",), "depths": (0.5,), "per_depth": 1, "ppl_windows": 1,
            "methods": {0.5: ("uniform", "duo", "duo-gradient")}}  # fmt: skip
    text = demo.run(str(src), grid, out=tmp_path / "demo", progress=False)
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(res["density"]) == {"dense", "uniform 0.5", "duo 0.5", "duo-gradient 0.5", "mixattn 0.5"}
    for N in ("768", "1024"):  # uniform is matched to the searched plan at every eval length
        assert abs(res["density"]["uniform 0.5"][N] - res["density"]["mixattn 0.5"][N]) <= 0.01
    assert "## Verdicts" in text and "density 0.5:" in text
    assert (tmp_path / "demo" / "plans" / "uniform_0.5@768.json").is_file()


@pytest.mark.parametrize("density", [0.5, 0.25, 0.1])
def test_baselines_meet_the_density_within_a_hundredth_at_every_length(density):
    from mixattn.compress.pipeline import duo_window

    rng = np.random.default_rng(0)
    scores = rng.random((30, 3)).tolist()
    for L in (1024, 2048, 4096, 8192):
        N = L + 16
        uni = Plan.uniform(30, 3, density, N)
        duo = Plan.duo(scores, density, N, 64, duo_window(density, N))
        assert abs(uni.density([N]) - density) <= 0.01, (L, uni.density([N]))
        assert abs(duo.density([N]) - density) <= 0.01, (L, duo.density([N]))


def test_eval_dtype_bfloat16_halves_the_kv_bytes_and_keeps_perplexity(tmp_path):
    src = _saved_tiny(tmp_path)
    res = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert main(["eval", str(src), "--tasks", "ppl,speed", "--lengths", "256", "--dtype", dtype,
                     "--out", str(out)]) == 0  # fmt: skip
        res[dtype] = json.loads((out / "results.json").read_text())
    f32, b16 = res["float32"], res["bfloat16"]
    assert b16["speed"]["dense"]["kv_bytes"] * 2 == f32["speed"]["dense"]["kv_bytes"]
    p32, p16 = f32["ppl"]["dense"]["256"]["ppl"], b16["ppl"]["dense"]["256"]["ppl"]
    # bf16 keeps 8 mantissa bits: logits of a few-layer model move by about 2^-8 relative, so the
    # perplexity (exp of a mean of log-probs) moves by a few percent at most, and it does move
    assert p16 != p32 and abs(p16 / p32 - 1) < 0.05


def test_eval_no_dense_scores_the_same_prompts_as_a_run_with_dense(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    src = _saved_tiny(tmp_path)
    cfg = mixattn.load(src).cfg
    plan_path = tmp_path / "u.json"
    Plan.uniform(cfg.num_layers, cfg.num_kv_heads, 0.5, 512, 4).save(plan_path)
    args = ["eval", str(src), "--plan", str(plan_path), "--baseline", "uniform:match", "--tasks", "passkey,ppl,speed",
            "--lengths", "512", "--depths", "0.5"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "with")]) == 0
    assert main([*args, "--no-dense", "--out", str(tmp_path / "without")]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("with", "without"))
    assert {r["method"] for r in b["retrieval"]} == {"u", "uniform @u"} and "dense" not in b["density"]
    strip = lambda r: [{k: x[k] for k in ("method", "task", "depth", "seed", "generated")} for x in r if x["method"] != "dense"]  # noqa: E731
    assert strip(a["retrieval"]) == strip(b["retrieval"])
    assert a["ppl"]["u"] == b["ppl"]["u"]
    assert main(["eval", str(src), "--no-dense", "--out", str(tmp_path / "none")]) == 2


def test_the_perplexity_guard_defaults_to_the_validation_length_and_0_turns_it_off(tmp_path, monkeypatch):
    from mixattn.compress import pipeline, select

    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))
    src = _saved_tiny(tmp_path)
    seen = []

    def spy(model, plans, samples, tok, stream, ppl_length, *rest):
        seen.append((ppl_length, None if stream is None else len(stream), {s.task for s in samples}))
        return plans[0], {"losses": [0.0] * len(plans), "hits": [0] * len(plans), "ppl": None}

    monkeypatch.setattr(select, "select_by_validation", spy)
    for ppl_length in (None, 0, 768):
        pipeline.compress(src, 0.5, lengths=(640,), samples=1, validate_length=1024, validate_samples=2,
                          ppl_length=ppl_length, ppl_windows=1, progress=False)  # fmt: skip
    # validation prompts are the tasks whose greedy hits can be counted (passkey, multikey)
    assert seen == [(1024, 1025, {"passkey", "multikey"}), (0, None, {"passkey", "multikey"}),
                    (768, 769, {"passkey", "multikey"})]  # fmt: skip


def test_eval_resumes_from_its_journal_and_restart_discards_it(tmp_path, monkeypatch, capsys):
    """A second run into the same --out reads every finished prompt back (no model call) and says so;
    --restart scores them again; the results are the same either way."""
    from mixattn.eval import retrieval

    src = _saved_tiny(tmp_path)
    args = ["eval", str(src), "--tasks", "passkey,ppl", "--lengths", "256", "--depths", "0.5", "--out", str(tmp_path / "e")]
    assert main(args) == 0
    first = json.loads((tmp_path / "e" / "results.json").read_text())
    calls = []
    real = retrieval.score
    monkeypatch.setattr(retrieval, "score", lambda *a, **k: calls.append(1) or real(*a, **k))
    capsys.readouterr()
    assert main(args) == 0 and calls == []
    assert "resuming: 2 finished" in capsys.readouterr().out  # one prompt, one perplexity
    again = json.loads((tmp_path / "e" / "results.json").read_text())
    assert again["retrieval"] == first["retrieval"] and again["ppl"] == first["ppl"]
    assert main([*args, "--restart"]) == 0 and len(calls) == 1
    assert main([*args, "--dtype", "bfloat16"]) == 2  # the journal is fp32's
    assert "is the journal of another run" in capsys.readouterr().err


def test_eval_so_far_reports_the_journal_without_computing_or_locking(tmp_path, monkeypatch, capsys):
    """--so-far reads a journal without the run's lock (a run in progress holds it), computes nothing
    and writes its tables to --out/so-far; with --restart, or with no journal yet, it says why not."""
    from mixattn.eval import retrieval
    from mixattn.paths import locked

    src = _saved_tiny(tmp_path)
    args = ["eval", str(src), "--tasks", "passkey,ppl", "--lengths", "256", "--depths", "0.5", "--out", str(tmp_path / "e")]
    assert main([*args, "--so-far"]) == 2
    assert "does not exist: no eval has journaled" in capsys.readouterr().err
    assert main(args) == 0
    first = json.loads((tmp_path / "e" / "results.json").read_text())
    monkeypatch.setattr(retrieval, "score", lambda *a, **k: pytest.fail("--so-far computed a prompt"))
    capsys.readouterr()
    with locked(tmp_path / "e"):  # "another eval is writing this folder"
        assert main([*args, "--so-far"]) == 0
    assert "so far: 2 finished" in capsys.readouterr().out
    seen = json.loads((tmp_path / "e" / "so-far" / "results.json").read_text())
    assert seen["retrieval"] == first["retrieval"] and seen["ppl"] == first["ppl"]
    assert main([*args[:-6], "--lengths", "300", *args[-4:], "--so-far"]) == 0  # another grid than the run's
    got = capsys.readouterr()
    assert "so far: 0 of them belong" in got.out and "none of the journal's prompts match" in got.err
    assert main([*args, "--so-far", "--restart"]) == 2
    assert "--restart would delete" in capsys.readouterr().err
