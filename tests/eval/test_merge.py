"""``mixattn report``: several eval runs joined into one report, equal to the report of one run that
had them all, and refused where the runs disagree on a prompt both scored."""

import copy
import json

import pytest

from mixattn.cli import main
from mixattn.eval import merge, report, verdict

from .test_report import _results

ALL = {"dense": 0.8, "mixattn 0.5": 0.8, "uniform @mixattn 0.5": 0.3, "p25": 0.6, "uniform @p25": 0.2}
# what one eval with every method pairs: each plan with dense and its baseline, each baseline with dense
PAIRS = [("mixattn 0.5", "dense"), ("mixattn 0.5", "uniform @mixattn 0.5"), ("uniform @mixattn 0.5", "dense"),
         ("p25", "dense"), ("p25", "uniform @p25"), ("uniform @p25", "dense")]  # fmt: skip


def _split(res, groups):
    """One results dict per group of methods, as separate evals (dense in the first only) would write."""
    out = []
    for methods in groups:
        part = {k: {m: v for m, v in res[k].items() if m in methods} for k in ("density", "ppl", "speed")}
        part["retrieval"] = [r for r in res["retrieval"] if r["method"] in methods]
        part["pairs"] = [list(p) for p in PAIRS if set(p) <= set(methods)]
        part["budgets"] = {m: d for m, d in res["budgets"].items() if m in methods}
        out.append(part)
    return out


def _full():
    res = _results(ALL, n=20)
    res["budgets"] = {"mixattn 0.5": 0.5, "p25": 0.25}
    return res


def test_merging_two_runs_gives_the_report_of_one_run_with_everything(tmp_path):
    res = _full()
    a, b = _split(res, [("dense", "mixattn 0.5", "uniform @mixattn 0.5"), ("p25", "uniform @p25")])
    merged, pairs, notes = merge.merge([("a", a), ("b", b)])
    # b ran without dense: its plan and baseline are paired with a's dense rows all the same
    assert notes == [] and sorted(pairs) == sorted(PAIRS) and [list(p) for p in b["pairs"]] == [["p25", "uniform @p25"]]
    one = report.write(res, tmp_path / "one", pairs=pairs, verdicts=verdict.searched_verdicts(res))
    two = report.write(merged, tmp_path / "two", pairs=pairs, verdicts=verdict.searched_verdicts(merged))
    assert two == one
    lines = verdict.searched_verdicts(merged)
    assert lines[0].startswith("density 0.5: mixattn 0.5") and lines[1].startswith("density 0.25: p25"), lines
    assert "vs dense None" not in lines[1]  # the 0.25 line reads dense from the other run


def test_a_prompt_scored_by_both_runs_is_kept_once_when_they_agree_and_refused_when_not():
    res = _full()
    a, b = _split(res, [("dense", "mixattn 0.5"), ("dense", "p25")])  # dense in both, on the same prompts
    merged, _, _ = merge.merge([("a", a), ("b", b)])
    assert sum(r["method"] == "dense" for r in merged["retrieval"]) == sum(r["method"] == "dense" for r in res["retrieval"])
    bad = copy.deepcopy(b)
    rec = next(r for r in bad["retrieval"] if r["method"] == "dense")
    rec["generated"] += " (another model)"
    with pytest.raises(ValueError, match=r"b and a both scored .*'method': 'dense'.* differ in generated"):
        merge.merge([("a", a), ("b", bad)])


@pytest.mark.parametrize("part", ["density", "ppl"])
def test_a_method_measured_differently_by_two_runs_is_refused(part):
    res = _full()
    a, b = _split(res, [("dense", "mixattn 0.5"), ("dense", "p25")])
    bad = copy.deepcopy(b)
    N = next(iter(bad[part]["dense"]))
    if part == "density":
        bad[part]["dense"][N] = 0.9
    else:
        bad[part]["dense"][N]["nll"] = [x + 1e-3 for x in bad[part]["dense"][N]["nll"]]
    with pytest.raises(ValueError, match=f"dense's {part} at {N} differs"):
        merge.merge([("a", a), ("b", bad)])


def test_speed_is_kept_from_the_first_run_and_the_others_are_noted():
    res = _full()
    a, b = _split(res, [("dense", "mixattn 0.5"), ("dense", "p25")])
    a["speed"] = {"dense": {"prefill_s": 1.0}}
    b["speed"] = {"dense": {"prefill_s": 2.0}}
    merged, _, notes = merge.merge([("a", a), ("b", b)])
    assert merged["speed"]["dense"]["prefill_s"] == 1.0 and len(notes) == 1 and "b's" in notes[0]


def test_report_cli_merges_folders_and_names_what_is_wrong(tmp_path, capsys):
    res = _full()
    for name, part in zip("ab", _split(res, [("dense", "mixattn 0.5", "uniform @mixattn 0.5"), ("p25", "uniform @p25")])):
        report.write(part, tmp_path / name, pairs=[tuple(p) for p in part["pairs"]])
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")]) == 0
    saved = json.loads((tmp_path / "m" / "results.json").read_text())
    assert saved["verdicts"] == verdict.searched_verdicts(res) and saved["budgets"] == res["budgets"]
    assert (tmp_path / "m" / "accuracy_vs_length.png").is_file()
    # an older results.json without budgets: --budget marks the plan; a label that is not there is refused
    old = json.loads((tmp_path / "b" / "results.json").read_text())
    del old["budgets"]
    (tmp_path / "b" / "results.json").write_text(json.dumps(old))
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--budget", "p25=0.25", "--out", str(tmp_path / "m2")]) == 0
    assert json.loads((tmp_path / "m2" / "results.json").read_text())["verdicts"] == saved["verdicts"]
    capsys.readouterr()
    (tmp_path / "f").write_text("")
    for argv, needle in [([str(tmp_path / "nowhere")], "nowhere: no results.json"),
                         ([str(tmp_path / "a"), "--budget", "p9=0.25"], "no searched plan 'p9'"),
                         ([str(tmp_path / "a"), "--budget", "dense=0.5"], "no searched plan 'dense'"),
                         ([str(tmp_path / "a"), "--budget", "mixattn 0.5=0.25"], "record mixattn 0.5 as searched at 0.5"),
                         ([str(tmp_path / "a"), "--budget", "p25=0.3"], "LABEL=0.5 or LABEL=0.25")]:  # fmt: skip
        assert main(["report", *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err
    for out, needle in [(tmp_path / "a", "is one of the sources"), (tmp_path / "f", "is a file")]:
        before = (tmp_path / "a" / "results.json").read_bytes()
        assert main(["report", str(tmp_path / "a"), "--out", str(out)]) == 2
        assert needle in capsys.readouterr().err and (tmp_path / "a" / "results.json").read_bytes() == before
    (tmp_path / "junk.json").write_text("{")
    assert main(["report", str(tmp_path / "junk.json"), "--out", str(tmp_path / "x")]) == 2
    assert "junk.json: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written on bad input


@pytest.mark.parametrize(
    "path, value, needle",
    [(("retrieval", 0, "length"), "1024", "retrieval[0].length must be an integer"),
     (("retrieval", 0, "hit"), None, "retrieval[0].hit must be true or false"),
     (("retrieval", 0, "depth"), [0.5], "retrieval[0].depth must be a number"),
     (("retrieval", 0), None, "retrieval[0] must be an object"),
     (("density",), [], "density must be an object"),
     (("density", "dense"), [1.0], "density['dense'] must be an object"),
     (("density", "dense", "abc"), 1.0, "density['dense'] key must be a length"),
     (("ppl", "dense", "4096"), {"ppl": 3.0}, "ppl['dense'][4096] must be an object with an 'nll' list"),
     (("pairs",), [["a"]], "pairs must be a list of [method, method]"),
     (("budgets",), {"p": "0.5"}, "budgets must be an object"),
     (("retrieval",), [], "no retrieval records in any source")],
)  # fmt: skip
def test_a_malformed_results_file_is_refused_naming_the_field_and_the_old_report_is_kept(tmp_path, capsys, path, value, needle):
    """Wrong types anywhere in a results.json stop the report with exit 2 and one line naming the
    file and the field; a report folder from an earlier run is left as it was."""
    res = json.loads(json.dumps(_full()))  # as read back from disk: lengths are strings
    node = res
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    (tmp_path / "bad.json").write_text(json.dumps(res))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_full()))
    assert main(["report", str(good), "--out", str(tmp_path / "out")]) == 0
    kept = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert main(["report", str(tmp_path / "bad.json"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == kept


def test_lengths_read_back_from_json_keep_the_density_table_whole(tmp_path):
    """A method with no prompts scored yet at a length shows its planned density there (from
    ``density``), also after a JSON round trip turned the lengths into strings."""
    res = _full()
    res["retrieval"] = [r for r in res["retrieval"] if not (r["method"] == "p25" and r["length"] == 2048)]
    (tmp_path / "r.json").write_text(json.dumps(res))
    merged, _, _ = merge.merge([merge.read(tmp_path / "r.json")])
    for table in (report.density_table(merged), report.density_table(json.loads((tmp_path / "r.json").read_text()))):
        assert "nan" not in table and "| p25 | 0.500 | 0.500 |" in table, table  # merged, and as the docs' tables read it


def test_the_quarter_density_line_says_not_shown_without_uniform_and_compares_like_lengths():
    res = _full()
    alone = dict(res, retrieval=[r for r in res["retrieval"] if r["method"] != "uniform @p25"])
    line = [v for v in verdict.searched_verdicts(alone) if v.startswith("density 0.25")][0]
    assert "uniform @p25 not evaluated -> NOT SHOWN" in line, line
    # dense scored at 2k and 4k, the plans only at 2k so far: the 0.5 line compares both at 2k only
    res = dict(_results(ALL, n=20, lengths=(2048, 4096)), budgets=res["budgets"])
    part = dict(res, retrieval=[dict(r, hit=r["hit"] and r["length"] == 2048) for r in res["retrieval"]
                                if r["method"] == "dense" or r["length"] == 2048])  # dense misses all at 4k
    line = verdict.searched_verdicts(part)[0]
    dense_2k = report.cells(part)[("dense", "all", 2048)]["acc"]
    assert report.cells(part)[("dense", "all", 4096)]["acc"] != dense_2k  # else the test could not tell
    assert f"vs dense {dense_2k:.2f} over 2k " in line, line
