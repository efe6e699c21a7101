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
    write never leaves a half-written file, and the previous file survives until the new one is whole.
    The temporary name carries the PID; leftovers of a killed writer are removed by the next write."""
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; a file is expected there")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
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


def load_torch(path: str | os.PathLike, what: str = "file", weights_only: bool = False):
    """``torch.load`` with a clear error naming ``path`` when the file is missing, truncated or not torch's
    (or, with ``weights_only``, when it holds anything but tensors and plain Python data)."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what}: {path}")
    try:
        return torch.load(path, weights_only=weights_only)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(target: Path) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings left by a killed save (dead PID only)."""
    import shutil

    if not target.parent.is_dir():
        return
    for p in target.parent.glob(f".{target.name}.*-*-*"):
        kind, _, rest = p.name[len(target.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def atomic_dir(target: str | os.PathLike, write) -> Path:
    """Run ``write(tmp_dir)`` then move ``tmp_dir`` onto ``target`` (replacing it) only on success.

    The previous ``target`` survives until the new one is complete. Temporary folders carry the
    writer's PID, so the leftovers of a killed writer are removed by the next save, never those of a
    live one."""
    import shutil
    import tempfile

    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; a folder is expected there")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        write(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


LOCK_NAME = ".mixattn.lock"


class locked:
    """``with locked(folder):`` holds an exclusive advisory lock (``flock``) on ``folder`` for one writer.
    A second process (or a second ``locked`` in this one) gets a ``ValueError`` naming the holder at
    once, instead of racing on the same files. The lock is released by the OS if the holder dies."""

    def __init__(self, folder: str | os.PathLike, wait: bool = False):
        self.folder = Path(folder)
        self.wait = wait  # block until the holder is done (caches) instead of failing (run folders)
        self._fh = None

    def __enter__(self) -> Path:
        import fcntl

        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"{self.folder} is a file; a folder is expected there")
        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.folder / LOCK_NAME, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise ValueError(f"{self.folder} is in use by {holder}; wait for it to finish or use another folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"mixattn process {os.getpid()}")
        fh.flush()
        self._fh = fh
        return self.folder

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()
        self._fh = None
        return False
