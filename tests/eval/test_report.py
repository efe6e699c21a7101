"""Report: tables carry n and Wilson intervals, paired tests pair the same prompts, files are written."""

import json
import random

from mixattn.eval import report, verdict


def _ppl(nll):
    return {"ppl": 2.718281828 ** (sum(nll) / len(nll)), "ppl_lo": 0.0, "ppl_hi": 0.0, "windows": len(nll), "nll": nll}


def _results(acc=None, n=6, lengths=(1024, 2048)):
    acc = acc or {"dense": 0.8, "mixattn 0.5": 0.7, "uniform 0.5": 0.3}
    rng = random.Random(0)
    recs = []
    for m, p in acc.items():
        for task in ("passkey", "multikey"):
            for N in lengths:
                for i in range(n):
                    recs.append({"method": m, "task": task, "length": N, "depth": (i % 3) / 2, "index": i // 3,
                                 "hit": rng.random() < p, "density": 1.0 if m == "dense" else 0.5,
                                 "generated": " 123", "logprob": -1.0, "seed": 1000 * N + 10 * i})  # fmt: skip
    dens = {m: {N: 1.0 if m == "dense" else 0.5 for N in lengths} for m in acc}
    base = [3.0, 3.2]  # two windows; the plans' NLL 0.01 above dense on each: ratio exp(0.01)
    ppl = {m: {4096: _ppl([x + (0.01 if m != "dense" else 0) for x in base])} for m in acc}
    return {"retrieval": recs, "density": dens, "ppl": ppl, "speed": {}}


def test_tables_show_n_intervals_density_and_paired_tests(tmp_path):
    res = _results()
    text = report.write(res, tmp_path, pairs=[("mixattn 0.5", "uniform 0.5")], verdicts=verdict.verdicts(res, (0.5,)))
    assert "n=6" in text and "n=12" in text  # per task and pooled
    assert "KV density @1024" in text and "0.500" in text
    assert "McNemar" in text and "| mixattn 0.5 | uniform 0.5 | all | 24 |" in text
    assert "density 0.5:" in text and ("MET" in text)
    assert json.loads((tmp_path / "results.json").read_text())["density"]["dense"]["1024"] == 1.0
    for png in ("accuracy_vs_length.png", "depth_length_heatmap.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_paired_test_uses_only_common_prompts():
    res = _results(n=6)
    res["retrieval"] = [r for r in res["retrieval"] if not (r["method"] == "uniform 0.5" and r["index"] == 1)]
    t = report.paired(res, "mixattn 0.5", "uniform 0.5")
    assert t["n"] == 2 * 2 * 3  # tasks x lengths x the depths of index 0


def test_verdict_says_not_met_when_the_plan_loses():
    res = _results({"dense": 1.0, "mixattn 0.5": 0.0, "uniform 0.5": 1.0}, n=6)
    lines = verdict.verdicts(res, (0.5,))
    assert "-> NOT MET" in lines[0] and "below uniform at 1024, 2048" in lines[0]
    assert "INCONCLUSIVE: n=6 per task cell < 20" in lines[0]  # small grids say so
    res = _results({"dense": 1.0, "mixattn 0.5": 1.0, "uniform 0.5": 0.0}, n=20)
    line = verdict.verdicts(res, (0.5,))[0]
    assert line.endswith("-> MET"), line


def test_perplexity_is_paired_over_windows_and_judged_by_its_interval():
    """Windows differ far more than methods on one window: the paired interval sees a +1% shift that
    the unpaired window intervals would bury; the verdict says MET only when the interval is within 5%."""
    res = _results()
    dense = [2.0, 3.0, 4.0, 2.5, 3.5, 2.2, 3.8, 2.9]
    plan = [x + 0.01 + 0.001 * (i % 2) for i, x in enumerate(dense)]
    res["ppl"] = {"dense": {4096: _ppl(dense)}, "mixattn 0.5": {4096: _ppl(plan)}}
    table = report.ppl_paired_table(res, [("mixattn 0.5", "dense")])
    assert "| mixattn 0.5 | dense | 4096 | 8 | 8 |" in table
    line = [v for v in verdict.verdicts(res, (0.5,)) if v.startswith("perplexity")][0]
    assert line.endswith("-> MET") and "+1.1%" in line, line
    res["ppl"]["mixattn 0.5"][4096] = _ppl([x + (0.10 if i % 2 else -0.08) for i, x in enumerate(dense)])  # mean +1%, noisy
    line = [v for v in verdict.verdicts(res, (0.5,)) if v.startswith("perplexity")][0]
    assert line.endswith("(the interval reaches past +5%)"), line
    res["ppl"]["mixattn 0.5"][4096] = _ppl([x + 0.06 for x in dense])
    assert [v for v in verdict.verdicts(res, (0.5,)) if v.startswith("perplexity")][0].endswith("-> NOT MET")


def test_verdicts_under_the_labels_eval_gives_equal_the_default_labels_and_say_when_uniform_is_missing():
    """``mixattn eval`` names a plan by its file ("p0.5", "uniform @p0.5"): the verdicts for those
    labels must be the same lines (bar the names) as for "mixattn 0.5" / "uniform 0.5"; without a
    uniform row the 0.5 target cannot be judged MET, and the line says why."""
    res = _results({"dense": 0.8, "mixattn 0.5": 0.8, "uniform 0.5": 0.3, "mixattn 0.25": 0.6, "uniform 0.25": 0.2}, n=20)
    names = {"mixattn 0.5": "p0.5", "uniform 0.5": "uniform @p0.5", "mixattn 0.25": "p0.25", "uniform 0.25": "uniform @p0.25"}
    renamed = dict(res, retrieval=[dict(r, method=names.get(r["method"], r["method"])) for r in res["retrieval"]],
                   ppl={names.get(m, m): v for m, v in res["ppl"].items()})  # fmt: skip
    labels = {0.5: ("p0.5", "uniform @p0.5"), 0.25: ("p0.25", "uniform @p0.25")}
    want = verdict.verdicts(res)
    got = verdict.verdicts(renamed, labels=labels)
    for old, new in names.items():
        want = [w.replace(old, new) for w in want]
    assert got == want and len(got) == 3 and got[0].endswith("-> MET"), got
    alone = dict(renamed, retrieval=[r for r in renamed["retrieval"] if r["method"] != "uniform @p0.5"])
    line = verdict.verdicts(alone, labels=labels)[0]
    assert "uniform not evaluated" in line and line.endswith("-> NOT MET"), line


def test_the_half_density_verdict_without_dense_is_not_judged_against_the_quarter_target():
    res = _results({"p": 0.5, "uniform @p": 0.25}, n=20)
    line = verdict.verdicts(res, (0.5,), {0.5: ("p", "uniform @p")})[0]
    assert "dense not evaluated" in line and line.endswith("-> NOT SHOWN") and "target >= 2" not in line, line
