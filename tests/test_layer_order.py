"""The package's layer order holds: no module imports a package on a higher floor.

    paths/argtypes < kernels < layers < models < data/metrics < train/compress/convert/parallel/mil
    < integrations < eval < demo/cli/package front door

Packages on one floor may import each other. KNOWN lists the upward imports still to remove; the
test fails if one of them disappears without being struck off (so the list only shrinks) and if a
new one appears.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mixattn"
FLOOR = {"paths": 0, "argtypes": 0, "kernels": 1, "layers": 2, "models": 3, "data": 4, "train": 5, "compress": 5,
         "convert": 5, "parallel": 5, "mil": 5, "metrics": 4, "integrations": 6, "eval": 7, "demo": 8, "cli": 8, "__init__": 8,
         "__main__": 8, "__version__": 8, "hf": 8, "load": 8, "load_tokenizer": 8, "export": 8}  # fmt: skip
KNOWN: set[tuple[str, str]] = set()  # upward imports still to remove: none left


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str]]:
    """(importing module, imported module) for every import of mixattn inside mixattn."""
    out = []
    for f in sorted(SRC.rglob("*.py")):
        parts = ("mixattn", *f.relative_to(SRC).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if f.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out += [(module, t) for t in names if t.split(".")[0] == "mixattn"]
    return out


def test_every_package_has_a_floor():
    packages = {p.name if p.is_dir() else p.stem for p in SRC.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert packages <= set(FLOOR), f"give these packages a floor: {sorted(packages - set(FLOOR))}"


def test_no_module_imports_a_higher_floor():
    up = {(a, b) for a, b in imports() if FLOOR[_package(a)] < FLOOR[_package(b)]}
    assert not up - KNOWN, "upward imports:\n" + "\n".join(f"{a} -> {b}" for a, b in sorted(up - KNOWN))
    assert not KNOWN - up, f"strike these off KNOWN, they are gone: {sorted(KNOWN - up)}"


def test_the_checker_resolves_relative_imports():
    found = imports()
    assert ("mixattn.eval.suite", "mixattn.compress.apply") in found  # from ..compress.apply import ...
    assert ("mixattn.data", "mixattn.data.corpora") in found  # from .corpora import ... in a package
    assert ("mixattn.cli", "mixattn.cli.parser") in found or ("mixattn.cli", "mixattn.cli.train_cmds") in found
