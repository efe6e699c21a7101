"""paths: atomic writes keep the old file on failure, clean up after dead writers only, and the
run-folder lock admits one writer at a time."""

import os
import subprocess
import sys

import pytest

from mixattn.paths import atomic_dir, content_digest, load_torch, locked, save_torch, write_json, write_text


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # finished and reaped: no such process now (PIDs are not reused this fast)


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text(tmp_path / "r.json", "old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    from mixattn.paths import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    for pid in (dead, live):
        (tmp_path / f".checkpoint.tmp-{pid}-abc").mkdir()
        (tmp_path / f".r.json.tmp-{pid}-xyz").write_text("partial")
    atomic_dir(tmp_path / "checkpoint", lambda tmp: (tmp / "a").write_text("1"))
    write_json(tmp_path / "r.json", {"a": 1})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["checkpoint", "r.json", f".checkpoint.tmp-{live}-abc", f".r.json.tmp-{live}-xyz"])


def test_write_refuses_a_folder_and_atomic_dir_a_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("keep")
    with pytest.raises(ValueError, match="is a folder"):
        write_text(tmp_path / "d", "x")
    with pytest.raises(ValueError, match="is a file"):
        atomic_dir(tmp_path / "f", lambda tmp: None)
    assert (tmp_path / "f").read_text() == "keep"


def test_lock_admits_one_writer_across_processes(tmp_path):
    code = f"from mixattn.paths import locked\nwith locked({str(tmp_path)!r}):\n    print('got it')"
    with locked(tmp_path):
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and "in use by mixattn process" in other.stderr
        with pytest.raises(ValueError, match="in use"):
            with locked(tmp_path):
                pass
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert again.returncode == 0 and "got it" in again.stdout


def test_truncated_torch_file_is_a_clear_error(tmp_path):
    path = save_torch(tmp_path / "s.pt", {"x": list(range(1000))})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="s.pt.*truncated"):
        load_torch(path, "state")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_torch(tmp_path / "missing.pt")


def test_content_digest_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "w.bin").write_bytes(b"\x00\x01" * 100)
    assert content_digest(a) == content_digest(b)
    (b / "w.bin").write_bytes(b"\x00\x02" * 100)
    assert content_digest(a) != content_digest(b)
    assert content_digest(a / "w.bin") != content_digest(b / "w.bin")
