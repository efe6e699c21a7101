"""Results tables in the docs, rendered from the JSON the commands wrote, so they cannot drift.

A markdown file marks each generated table with an opening and a closing comment:

    <!-- table: docs/results/grid.json retrieval -->
    | method | task | 1024 | ... |
    <!-- /table -->

The path is relative to the repository root (the folder holding ``pyproject.toml``); the kind is one
of ``retrieval``, ``pooled`` (the retrieval rows pooled over tasks only), ``density``, ``paired``,
``logprob`` (the answer's log-probability, paired), ``other`` (perplexity and speed) or ``verdicts``.

    python -m mixattn.eval.tables README.md docs/experiments.md          # rewrite the blocks
    python -m mixattn.eval.tables --check README.md docs/experiments.md  # exit 1 where one differs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..paths import write_text
from . import report

BLOCK = re.compile(r"(<!-- table: (\S+) (\w+) -->\n)(.*?)(<!-- /table -->)", re.S)
KINDS = ("retrieval", "pooled", "density", "paired", "logprob", "other", "ppl_paired", "verdicts")


def render(results: dict, kind: str) -> str:
    """One table (or the verdict list) of ``results`` as markdown, without a trailing newline."""
    if kind == "retrieval":
        return report.retrieval_table(results)
    if kind == "pooled":
        head, rule, *rows = report.retrieval_table(results).split("\n")
        return "\n".join([head, rule, *(r for r in rows if r.split("|")[2].strip() == "all")])
    if kind == "density":
        return report.density_table(results)
    if kind == "paired":
        return report.paired_table(results, [tuple(p) for p in results.get("pairs", [])])
    if kind == "logprob":
        return report.logprob_table(results, [tuple(p) for p in results.get("pairs", [])])
    if kind == "other":
        return report.other_table(results)
    if kind == "ppl_paired":
        return report.ppl_paired_table(results, [tuple(p) for p in results.get("pairs", [])])
    if kind == "verdicts":
        return "\n".join(f"- {v}" for v in results.get("verdicts", []))
    raise ValueError(f"unknown table kind {kind!r}; valid: {', '.join(KINDS)}")


def sync(text: str, root: Path, where: str = "document") -> str:
    """``text`` with every marked block re-rendered from its JSON file under ``root``."""

    def one(m: re.Match) -> str:
        path = root / m.group(2)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: table source {m.group(2)} does not exist")
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: {m.group(2)} is not valid JSON ({e})") from None
        return f"{m.group(1)}{render(results, m.group(3))}\n{m.group(5)}"

    return BLOCK.sub(one, text)


def repo_root(start: Path) -> Path:
    for p in [start.resolve(), *start.resolve().parents]:
        if (p / "pyproject.toml").is_file():
            return p
    raise FileNotFoundError(f"no pyproject.toml above {start}: cannot resolve table paths")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixattn.eval.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its JSON")
    args = ap.parse_args(argv)
    stale = []
    for f in args.files:
        text = f.read_text()
        new = sync(text, repo_root(f.parent), str(f))
        if new != text:
            stale.append(str(f))
            if not args.check:
                write_text(f, new)
    if stale:
        print(("out of date: " if args.check else "updated: ") + ", ".join(stale))
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
