"""An append-only record of finished evaluation work, so that an interrupted ``mixattn eval`` resumes
where it stopped instead of starting over (the full grid is hours of CPU time).

One JSON object per line: a header (what the run is: model, dtype) and then one line per finished
unit (a retrieval prompt scored by one plan, or one plan's perplexity at one length), keyed by
everything its result depends on, including a digest of the plan's rules. A rerun of the same
command reads the journal and recomputes only the missing units; a changed plan has another digest
and is recomputed. A line torn by a kill mid-write is dropped on reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..paths import write_text


def recall(journal, key: list, compute):
    """``journal``'s result for ``key``, or ``compute()`` (added to the journal); no journal: computed.
    ``compute`` None: only what the journal holds (None for a unit not finished yet)."""
    got = journal.get(key) if journal is not None else None
    if got is None and compute is not None:
        got = compute()
        if journal is not None:
            journal.put(key, got)
    return got


def plan_digest(plan) -> str:
    """``Plan.digest`` (its rules, not its meta); "dense" for no plan."""
    return "dense" if plan is None else plan.digest()


class Journal:
    """``get(key)`` a finished unit's result or None; ``put(key, value)`` appends it (flushed at once).

    ``read_only``: a look at a journal another process may be writing (``mixattn eval --so-far``). It
    must exist; a torn last line (a write in progress) is skipped but never repaired, and ``put`` is
    refused."""

    def __init__(self, path: str | os.PathLike, header: dict, read_only: bool = False):
        self.path, self.done, self.read_only = Path(path), {}, read_only
        want = {"journal": 1, **header}
        if read_only and not self.path.is_file():
            raise ValueError(f"{self.path} does not exist: no eval has journaled into this --out yet")
        if not self.path.is_file():
            write_text(self.path, json.dumps(want) + "\n")
            return
        lines = self.path.read_text().splitlines()
        try:
            have = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            have = None
        if have != want:
            fix = ("give the model and --dtype of the run that wrote it, with the mixattn version it ran" if read_only else
                   "choose another --out, or start over with --restart (deletes the journal)")  # fmt: skip
            raise ValueError(f"{self.path} is the journal of another run ({have}); this run is {want}: {fix}")
        good = [lines[0]]
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                self.done[json.dumps(rec["key"])] = rec["value"]
                good.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # torn by a kill: recomputed
                continue
        if len(good) < len(lines) and not read_only:
            write_text(self.path, "\n".join(good) + "\n")

    def __len__(self) -> int:
        return len(self.done)

    def get(self, key: list):
        return self.done.get(json.dumps(key))

    def put(self, key: list, value) -> None:
        if self.read_only:
            raise ValueError(f"{self.path} was opened read-only")
        self.done[json.dumps(key)] = value
        with self.path.open("a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
