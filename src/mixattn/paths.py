"""Where mixattn caches things: ``$MIXATTN_CACHE``, else ``$XDG_CACHE_HOME/mixattn``, else ``~/.cache/mixattn``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("MIXATTN_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixattn"
