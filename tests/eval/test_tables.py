"""Docs tables are rendered from results JSON (``mixattn.eval.tables``) and stay in sync with it."""

import json
from pathlib import Path

import pytest

from mixattn.eval import report, tables

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "experiments.md"]


def _results():
    recs = [{"method": m, "task": task, "length": 1024, "depth": 0.5, "index": i, "seed": i, "hit": hit,
             "density": d, "prompt_len": 1020, "ref_len": 1040, "logprob": -1.0}
            for m, d, hits in (("dense", 1.0, (1, 1, 0)), ("mixattn 0.5", 0.5, (1, 0, 0))) for i, hit in enumerate(hits)
            for task in ("passkey", "multikey")]
    return {"retrieval": recs, "density": {"dense": {"1024": 1.0}, "mixattn 0.5": {"1024": 0.5}}, "ppl": {},
            "speed": {}, "pairs": [["mixattn 0.5", "dense"]], "verdicts": ["density 0.5: NOT MET"]}


def test_docs_tables_match_their_json():
    assert tables.main(["--check", *map(str, DOCS)]) == 0, "run: python -m mixattn.eval.tables README.md docs/experiments.md"


def test_a_stale_block_is_rerendered_and_check_fails(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "r.json").write_text(json.dumps(_results()))
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- table: r.json retrieval -->\n| stale |\n<!-- /table -->\nend\n")
    assert tables.main(["--check", str(doc)]) == 1 and "stale" in doc.read_text()
    assert tables.main([str(doc)]) == 0
    text = doc.read_text()
    assert report.retrieval_table(_results()) in text and "stale" not in text and text.endswith("<!-- /table -->\nend\n")
    assert "0.67 [" in text and "0.33 [" in text  # 2/3 and 1/3 hits with their Wilson intervals
    assert tables.main(["--check", str(doc)]) == 0
    doc.write_text("<!-- table: r.json pooled -->\n<!-- /table -->\n")
    tables.main([str(doc)])
    pooled = doc.read_text().splitlines()[1:-1]
    assert len(pooled) == 2 + 2 and all("| all |" in r for r in pooled[2:])  # header, rule, one row per method
    doc.write_text("<!-- table: r.json verdicts -->\n<!-- /table -->\n")
    tables.main([str(doc)])
    assert "- density 0.5: NOT MET" in doc.read_text()
    doc.write_text("<!-- table: r.json logprob -->\n<!-- /table -->\n")
    tables.main([str(doc)])
    row = doc.read_text().splitlines()[3]  # every log p is -1.0 in both methods: all 6 pairs tie
    assert row.startswith("| mixattn 0.5 | dense | 6 | 0 | 0 | +0.00 | 1 | 1 |")


def test_bad_sources_name_the_file(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table: missing.json retrieval -->\n<!-- /table -->\n")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tables.main([str(doc)])
    (tmp_path / "bad.json").write_text("{")
    doc.write_text("<!-- table: bad.json retrieval -->\n<!-- /table -->\n")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        tables.main([str(doc)])
    (tmp_path / "r.json").write_text(json.dumps(_results()))
    doc.write_text("<!-- table: r.json pie -->\n<!-- /table -->\n")
    with pytest.raises(ValueError, match="unknown table kind 'pie'"):
        tables.main([str(doc)])
