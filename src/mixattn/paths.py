"""Where mixattn caches things: ``$MIXATTN_CACHE``, else ``$XDG_CACHE_HOME/mixattn``, else ``~/.cache/mixattn``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("MIXATTN_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixattn"


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``: an interrupted or failed
    write never leaves a half-written file, and the previous file survives until the new one is whole."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_json(path: str | os.PathLike, missing: str = "no such file"):
    """Parse a JSON file; a missing file or invalid JSON is an error naming the path."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{missing}: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); truncated?") from None


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary sibling, then rename)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    import json

    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def save_torch(path: str | os.PathLike, obj) -> Path:
    """``torch.save`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """``fig.savefig`` to ``path`` atomically (the format follows ``path``'s suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def load_torch(path: str | os.PathLike, what: str = "file"):
    """``torch.load`` with a clear error naming ``path`` when the file is missing, truncated or not torch's."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what}: {path}")
    try:
        return torch.load(path, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: unreadable {what} ({type(e).__name__}: {str(e)[:120]}); truncated?") from None


def content_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex, 16 chars) of a file's bytes, or of every file under a directory (names and bytes):
    caches keyed by it follow the content, not the path."""
    import hashlib

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
