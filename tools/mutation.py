"""`make mutation`: mutmut 3 over the modules where a silent bug costs most, one module group at a time.

    python tools/mutation.py [--fresh] [--jobs N] [--only GROUP ...] [--survivors] [--report-only]

mutmut (configured in pyproject's [tool.mutmut]) copies `src/` into `mutants/` (a snapshot: edits made
to `src/` while it runs do not reach the mutants), runs the tests of `pytest_add_cli_args_test_selection`
once to learn which tests execute which function, then runs each mutant against only those tests.
This script runs it group by group (one mutmut process at a time, OMP_NUM_THREADS=1) and prints

    mutation score: X% (killed/total)

plus one line per module. Killed = a test failed or the mutant timed out (an infinite loop is caught);
total counts every mutant, including those no selected test executes ("no tests").

Two adjustments to mutmut, applied in the process that runs it:
- mutmut skips every decorated function. The kernels are registered with `@register(...)` and the
  scoring functions run under `@torch.no_grad()`, so those would never be mutated. Functions whose
  decorators are all in DECORATORS_OK are mutated; the decorators stay on mutmut's dispatching
  trampoline and are removed from its undecorated copies (the original and each mutant), so
  registration runs once and gradient mode is set as before.
- Functions run only at import time (a decorator's body) cannot be switched per test by mutmut's
  trampolines; they are left unmutated (IMPORT_TIME).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# group -> the modules (files under src/mixattn) it mutates; mirrors [tool.mutmut] only_mutate.
GROUPS = {  # run in this order; the kernels last (their flex mutants compile, the slowest to test)
    "routers-losses": ["layers/routers.py", "layers/losses.py"],
    "gguf": ["models/hf/gguf.py"],
    "plan": ["compress/plan.py"],
    "optimize": ["compress/optimize.py"],
    "calibration-profile": ["compress/calibration.py", "compress/profile.py"],
    "resume": ["models/checkpoint.py", "train/loop.py"],
    "eval": ["data/tasks.py", "eval/retrieval.py", "metrics/perplexity.py"],
    "kernels": ["kernels/reference.py", "kernels/sparse.py", "kernels/grouped.py", "kernels/head_sparse.py"],
}

DECORATORS_OK = ("register(", "torch.no_grad()", "functools.cache", "_per_sample")
# In these files only the named functions are mutated: the training loop's resume path (restore,
# save, one step), not its logging and scheduling.
FUNCTIONS_ONLY = {"src/mixattn/train/loop.py": {"restore", "save", "_step"}}
IMPORT_TIME = {"_per_sample", "register"}

KILLED = {"killed", "timeout", "segfault"}


def in_sample(name: str, every: int) -> bool:
    """A fixed pseudo-random 1/``every`` of the mutants (by a hash of the mutant's name)."""
    return every <= 1 or zlib.crc32(name.encode()) % every == 0


def mutant_names(mod: str, every: int = 1) -> list[str]:
    meta = ROOT / "mutants" / "src" / "mixattn" / (mod + ".meta")
    if not meta.exists():
        return []
    return [k for k in sorted(json.loads(meta.read_text())["exit_code_by_key"]) if in_sample(k, every)]


def _patch_mutmut() -> None:
    import libcst as cst
    from mutmut.mutation import file_mutation as fm

    fm.NEVER_MUTATE_FUNCTION_NAMES |= IMPORT_TIME

    def ok(dec: cst.Decorator) -> bool:
        code = cst.Module(body=[]).code_for_node(dec.decorator)
        return code.startswith(DECORATORS_OK)

    current = {"file": ""}
    create = fm.create_mutations

    def _create(filename, *args, **kw):
        current["file"] = str(filename)
        return create(filename, *args, **kw)

    fm.create_mutations = _create

    skip = fm.MutationVisitor._skip_node_and_children

    def _skip(self, node):
        only = next((v for k, v in FUNCTIONS_ONLY.items() if current["file"].endswith(k)), None)
        if only is not None and isinstance(node, cst.FunctionDef) and node.name.value not in only:
            return True
        if isinstance(node, cst.FunctionDef) and node.decorators and all(ok(d) for d in node.decorators):
            if node.name.value in fm.NEVER_MUTATE_FUNCTION_NAMES:
                return True
            return skip(self, node.with_changes(decorators=[]))
        return skip(self, node)

    fm.MutationVisitor._skip_node_and_children = _skip

    arrange = fm.function_trampoline_arrangement

    def _arrange(function, mutants, class_name):
        decl, nodes, assign, names = arrange(function, mutants, class_name)
        nodes = [nodes[0]] + [
            n.with_changes(decorators=[d for d in n.decorators if not ok(d)]) if isinstance(n, cst.FunctionDef) else n
            for n in nodes[1:]
        ]
        return decl, nodes, assign, names

    fm.function_trampoline_arrangement = _arrange


def _generate_mutants(jobs: int) -> None:
    """Only mutmut's first step: copy src/ into mutants/ and write the mutated files (no test run)."""
    _patch_mutmut()
    from mutmut import __main__ as mm

    mm.set_mutant_under_test("mutant_generation")
    (ROOT / "mutants").mkdir(exist_ok=True)
    mm.copy_src_dir()
    mm.copy_also_copy_files()
    mm.setup_source_paths()
    mm.create_mutants(jobs)


def _run_mutmut(args: list[str]) -> None:
    _patch_mutmut()
    from mutmut.__main__ import cli

    sys.argv = ["mutmut", *args]
    cli()


def results(every: int = 1) -> dict[str, dict[str, int]]:
    from mutmut.stats import status_by_exit_code

    out = {}
    for mods in GROUPS.values():
        for mod in mods:
            meta = ROOT / "mutants" / "src" / "mixattn" / (mod + ".meta")
            counts: dict[str, int] = {}
            if meta.exists():
                for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
                    if in_sample(key, every):
                        s = status_by_exit_code[code]
                        counts[s] = counts.get(s, 0) + 1
            out[mod] = counts
    return out


def survivors(mods: list[str], every: int = 1) -> list[str]:
    from mutmut.stats import status_by_exit_code

    names = []
    for mod in mods:
        meta = ROOT / "mutants" / "src" / "mixattn" / (mod + ".meta")
        if meta.exists():
            for key, code in sorted(json.loads(meta.read_text())["exit_code_by_key"].items()):
                if in_sample(key, every) and status_by_exit_code[code] not in KILLED:
                    names.append(f"{status_by_exit_code[code]:>10}  {key}")
    return names


def report(groups: list[str], show_survivors: bool, every: int = 1) -> None:
    res = results(every)
    tk = tt = 0
    for g in groups:
        for mod in GROUPS[g]:
            c = res[mod]
            k = sum(v for s, v in c.items() if s in KILLED)
            t = sum(c.values())
            tk, tt = tk + k, tt + t
            other = ", ".join(f"{s} {v}" for s, v in sorted(c.items()) if s not in KILLED)
            pct = f"{100 * k / t:5.1f}%" if t else "    -"
            print(f"  {mod:28s} {pct} ({k}/{t}){'  not killed: ' + other if other else ''}")
    if show_survivors:
        print("survivors:")
        for g in groups:
            for line in survivors(GROUPS[g], every):
                print("  " + line)
    sample = f", a fixed 1/{every} sample of the mutants" if every > 1 else ""
    print(f"mutation score: {100 * tk / max(tt, 1):.1f}% ({tk}/{tt}{sample})")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--generate":
        os.chdir(ROOT)
        _generate_mutants(2)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--mutmut":
        os.chdir(ROOT)
        _run_mutmut(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fresh", action="store_true", help="delete mutants/ first (a new snapshot of src/, no cached results)")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    ap.add_argument("--only", nargs="*", choices=sorted(GROUPS), help="module groups to run (default all)")
    ap.add_argument("--survivors", action="store_true", help="list the mutants not killed")
    ap.add_argument("--report-only", action="store_true", help="print the scores of the last run")
    ap.add_argument("--sample", type=int, default=1, help="test a fixed 1/N of the mutants (by name hash; default all)")
    ap.add_argument("--together", action="store_true", help="one mutmut run for all the groups (one start-up)")
    ap.add_argument("--retry", action="store_true", help="rerun only the mutants the last run did not kill (after adding tests)")
    ap.add_argument("--show", nargs="*", default=None, help="print the diff of these mutants (or of every survivor) and exit")
    a = ap.parse_args()
    groups = a.only or list(GROUPS)
    os.chdir(ROOT)
    if a.show is not None:
        listed = [line.strip().rsplit(None, 1) for g in groups for line in survivors(GROUPS[g], a.sample)]
        names = a.show or [n for st, n in listed if st != "not checked"]
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--mutmut", "show", name], capture_output=True, text=True).stdout
            diff = [x for x in out.splitlines() if x[:1] in "+-" and x[:3] not in ("+++", "---")]
            print(name + "\n" + "\n".join("    " + x for x in diff))
        return
    if not a.report_only:
        if a.fresh:
            shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        t0 = time.time()
        batches = [[g] for g in groups] if not a.together else [groups]
        for batch in batches:
            g = "+".join(batch)
            pats = [f"mixattn.{m[:-3].replace('/', '.')}.*" for b in batch for m in GROUPS[b]]
            if a.sample > 1 and not a.retry:
                if not any(mutant_names(m) for b in batch for m in GROUPS[b]):  # mutants not generated yet: generate them
                    subprocess.call([sys.executable, __file__, "--generate"], env=env, stdout=subprocess.DEVNULL)
                pats = [n for b in batch for m in GROUPS[b] for n in mutant_names(m, a.sample)]
            if a.retry:
                pats = [line.split()[-1] for b in batch for line in survivors(GROUPS[b], a.sample)]
            if not pats:
                continue
            print(f"== {g}: {' '.join(pats) if len(pats) <= 4 else f'{len(pats)} mutants'}", flush=True)
            t = time.time()
            log = ROOT / "mutants" / f"log-{g}.txt"
            log.parent.mkdir(exist_ok=True)
            with open(log, "w") as f:
                rc = subprocess.call(
                    [sys.executable, __file__, "--mutmut", "run", "--max-children", str(a.jobs), *pats],
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            print(f"   mutmut exit {rc}, {time.time() - t:.0f} s (log: {log.relative_to(ROOT)})", flush=True)
        print(f"wall time: {time.time() - t0:.0f} s")
    report(groups, a.survivors, a.sample)


if __name__ == "__main__":
    main()
