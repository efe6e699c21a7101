"""Merge `mixattn eval` results.json files into one results.json/results.md/plots, relabelled.

`mixattn eval` always runs dense and matches `uniform:match` to its first plan only, so a
comparison at equal density for two plans takes two invocations; this merges them. Dense, repeated
in every file on the same prompts, must be identical there (it is kept once); files over disjoint
prompts (one task each, say) are concatenated.

    python docs/results/search_2k/combine.py OUT '{"old label": "new label", ...}' '[["a", "b"], ...]' A.json B.json
"""

import json
import sys
from pathlib import Path

from mixattn.eval.report import write


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
    order = list(dict.fromkeys(names.get(m, m) for m in ["dense", *names]))
    res["density"] = {m: res["density"][m] for m in order if m in res["density"]}
    res["ppl"] = {m: res["ppl"][m] for m in order if m in res["ppl"]}
    res["retrieval"].sort(key=lambda x: (order.index(x["method"]), x["task"] != "passkey", *key(x)[1:]))
    print(write(res, Path(out), pairs=[tuple(p) for p in pairs]))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:])
