"""Merge `mixattn eval` results.json files into one results.json/results.md/plots, relabelled.

`mixattn eval` always runs dense and matches `uniform:match` to its first plan only, so a
comparison at equal density for two plans takes two invocations; this merges them. Dense, repeated
in every file on the same prompts, must be identical there (it is kept once); files over disjoint
prompts (one task each, say) are concatenated.

    python docs/results/search_2k/combine.py OUT '{"old label": "new label", ...}' '[["a", "b"], ...]' A.json B.json

Where the labels include "mixattn D" and "uniform D", the targets' verdict lines are written too.
"""

import json
import sys
from pathlib import Path

from mixattn.eval.report import write
from mixattn.eval.verdict import verdicts


def key(x):
    return x["task"], x["length"], x["depth"], x["index"]


def main(out, names, pairs, files):
    res = {"retrieval": [], "density": {}, "ppl": {}, "speed": {}}
    dense = None
    for f in files:
        r = json.loads(Path(f).read_text())
        again = {key(x): x for x in r["retrieval"] if x["method"] == "dense"}
        if dense is None:
            dense = again
        elif again.keys() == dense.keys():  # the same prompts: dense must be identical
            assert all(again[k]["generated"] == dense[k]["generated"] and again[k]["seed"] == dense[k]["seed"] for k in dense), (
                f"{f}: dense differs"
            )
            r["retrieval"] = [x for x in r["retrieval"] if x["method"] != "dense"]
        else:  # disjoint prompts: concatenate
            assert not again.keys() & dense.keys(), f"{f}: overlaps a previous file"
            dense.update(again)
        for m, d in r["density"].items():
            seen = res["density"].setdefault(names.get(m, m), {})
            for N, v in d.items():
                assert abs(seen.setdefault(int(N), v) - v) < 1e-12, f"{f}: {m} density @{N} differs"
        res["retrieval"] += [dict(x, method=names.get(x["method"], x["method"])) for x in r["retrieval"]]
        for m, by_len in r.get("ppl", {}).items():  # perplexity windows, relabelled (dense kept once)
            res["ppl"].setdefault(names.get(m, m), {}).update(by_len)
    seen = [x["method"] for x in res["retrieval"]] + list(res["density"]) + list(res["ppl"])
    order = list(dict.fromkeys([*(names.get(m, m) for m in ["dense", *names]), *seen]))
    res["density"] = {m: res["density"][m] for m in order if m in res["density"]}
    res["ppl"] = {m: res["ppl"][m] for m in order if m in res["ppl"]}
    res["retrieval"].sort(key=lambda x: (order.index(x["method"]), x["task"] != "passkey", *key(x)[1:]))
    densities = [float(m.split()[1]) for m in order if m.startswith("mixattn ") and f"uniform {m.split()[1]}" in order]
    lines = verdicts(res, densities) if densities else None  # the targets, where the labels allow
    print(write(res, Path(out), pairs=[tuple(p) for p in pairs], verdicts=lines))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:])
