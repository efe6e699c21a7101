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
