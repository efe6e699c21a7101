"""The secondary score of a results.json: per method, how many prompts keep the key's log-probability
above THRESHOLD nats (chance for a 7-digit key is 7 ln 10 = -16.1), with its Wilson interval, the
needle depths where it is lost, and paired exact McNemar tests on that binary outcome. The paired
tests without a threshold (sign, Wilcoxon) are the reports' ``logprob`` table (``mixattn.eval.report``).

    python docs/results/search_2k/key_logprob.py docs/results/search_2k/results.json "a|b" ...
"""

import json
import sys

from mixattn.metrics.stats import fmt_cell, mcnemar, proportion

THRESHOLD = -10.0


def main(path, pairs):
    r = json.load(open(path))
    by = {}
    for x in r["retrieval"]:
        by.setdefault(x["method"], {})[(x["task"], x["length"], x["depth"], x["index"])] = x["logprob"]
    ks = sorted(next(iter(by.values())))
    kept = {m: [v[k] > THRESHOLD for k in ks] for m, v in by.items()}
    lost = [v for m in by.values() for v in m.values() if v <= THRESHOLD]
    rest = [v for m in by.values() for v in m.values() if v > THRESHOLD]
    print(f"log p(key) <= {THRESHOLD}: max {max(lost, default=float('nan')):.2f}; above: min {min(rest):.2f}\n")
    print(f"| method | key log p > {THRESHOLD:g} | median log p | lost at depths |\n|---|---|---|---|")
    for m, v in by.items():
        med = sorted(v.values())[len(v) // 2]
        depths = sorted({k[2] for k in ks if v[k] <= THRESHOLD})
        print(f"| {m} | {fmt_cell(proportion(kept[m]))} | {med:.2f} | {', '.join(map(str, depths)) or '–'} |")
    print("\n| a | b | n | a only | b only | p |\n|---|---|---|---|---|---|")
    for a, b in (p.split("|") for p in pairs):
        t = mcnemar(kept[a], kept[b])
        print(f"| {a} | {b} | {t['n']} | {t['a_only']} | {t['b_only']} | {t['p']:.3g} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
