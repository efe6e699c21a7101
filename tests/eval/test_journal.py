"""A resumable eval: finished prompts and perplexities are journaled and read back, not recomputed."""

import json

import pytest
import torch

from mixattn import ByteTokenizer
from mixattn.compress.plan import Plan
from mixattn.eval import retrieval, suite
from mixattn.eval.journal import Journal, plan_digest
from mixattn.models.config import PRESETS
from mixattn.models.decoder import MixtureLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MixtureLM(PRESETS["tiny"].evolve(max_seq_len=1024)).float().eval()


def _run(model, plans, journal):
    return suite.evaluate(model, ByteTokenizer(), plans, ["passkey", "ppl"], [300], [0.5], 2, ppl_windows=2,
                          progress=False, journal=journal)  # fmt: skip


def test_a_rerun_reads_every_unit_back_and_recomputes_only_a_changed_plan(model, tmp_path, monkeypatch):
    L, H = model.cfg.num_layers, model.cfg.num_kv_heads
    plans = {"dense": None, "u": Plan.uniform(L, H, 0.5, 316)}
    first = _run(model, plans, Journal(tmp_path / "j.jsonl", {"model": "tiny"}))
    assert len(Journal(tmp_path / "j.jsonl", {"model": "tiny"})) == 2 * 2 + 2  # 2 prompts x 2 plans, 2 ppl
    calls = []
    real = retrieval.score
    monkeypatch.setattr(retrieval, "score", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _run(model, plans, Journal(tmp_path / "j.jsonl", {"model": "tiny"}))
    assert calls == [] and again["retrieval"] == first["retrieval"] and again["ppl"] == first["ppl"]
    plans["u"] = Plan.uniform(L, H, 0.3, 316)  # same label, other rules: another digest, recomputed
    _run(model, plans, Journal(tmp_path / "j.jsonl", {"model": "tiny"}))
    assert len(calls) == 2


def test_a_torn_last_line_is_dropped_and_that_unit_recomputed(model, tmp_path, monkeypatch):
    path = tmp_path / "j.jsonl"
    first = _run(model, {"dense": None}, Journal(path, {"model": "tiny"}))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    journal = Journal(path, {"model": "tiny"})
    assert len(journal) == len(lines) - 2 and all(json.loads(x) for x in path.read_text().splitlines())
    again = _run(model, {"dense": None}, journal)
    assert again["retrieval"] == first["retrieval"] and again["ppl"] == first["ppl"]


def test_a_journal_of_another_run_is_refused_by_name(tmp_path):
    Journal(tmp_path / "j.jsonl", {"model": "a", "dtype": "float32"})
    with pytest.raises(ValueError, match=r"j\.jsonl is the journal of another run.*--restart"):
        Journal(tmp_path / "j.jsonl", {"model": "a", "dtype": "bfloat16"})


def test_plan_digest_follows_the_rules_not_the_metadata():
    a, b = Plan.uniform(2, 2, 0.5, 256), Plan.uniform(2, 2, 0.5, 256)
    b.meta["note"] = "other"
    assert plan_digest(a) == plan_digest(b) != plan_digest(Plan.uniform(2, 2, 0.4, 256)) and plan_digest(None) == "dense"


def test_so_far_reports_exactly_the_finished_units_and_never_writes(model, tmp_path, monkeypatch):
    """A look at a run in progress: with part of the journal (and a line being written), ``so_far``
    returns those records and perplexities, calls no scorer, and leaves the file byte for byte."""
    L, H = model.cfg.num_layers, model.cfg.num_kv_heads
    plans = {"dense": None, "u": Plan.uniform(L, H, 0.5, 316)}
    path = tmp_path / "j.jsonl"
    full = _run(model, plans, Journal(path, {"model": "tiny"}))
    lines = path.read_text().splitlines()
    kept = lines[:3]  # the header and two finished units
    path.write_text("\n".join(kept) + "\n" + lines[3][:10])  # the writer is mid-line
    before = path.read_bytes()
    monkeypatch.setattr(retrieval, "score", lambda *a, **k: pytest.fail("so_far computed a prompt"))
    journal = Journal(path, {"model": "tiny"}, read_only=True)
    got = suite.evaluate(model, ByteTokenizer(), plans, ["passkey", "ppl", "speed"], [300], [0.5], 2, ppl_windows=2,
                         progress=False, journal=journal, so_far=True)  # fmt: skip
    assert path.read_bytes() == before
    finished = [json.loads(x)["key"] for x in kept[1:]]
    want = [r for r in full["retrieval"] if any(k[0] == "retrieval" and k[4:6] == [r["depth"], r["index"]]
            and k[1] == ("dense" if r["method"] == "dense" else plans["u"].digest()) for k in finished)]  # fmt: skip
    assert got["retrieval"] == want and len(want) == sum(k[0] == "retrieval" for k in finished)
    n_ppl = sum(len(v) for v in got["ppl"].values())
    assert n_ppl == sum(k[0] == "ppl" for k in finished) and got["speed"] == {}
    with pytest.raises(ValueError, match="read-only"):
        journal.put(["x"], 1)
    with pytest.raises(ValueError, match=r"journal of another run.*give the model and --dtype"):
        Journal(path, {"model": "other"}, read_only=True)
    with pytest.raises(ValueError, match=r"nothing\.jsonl does not exist"):
        Journal(tmp_path / "nothing.jsonl", {"model": "tiny"}, read_only=True)
