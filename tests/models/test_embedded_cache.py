"""The converted copy of the embedded GGUF is reused only while it matches the installed file."""

import json

from mixattn.models.hf import _converted


def test_conversion_is_reused_only_for_the_same_source(tmp_path):
    stamp = {"source": "/site-packages/x.gguf", "source_size": 10, "source_mtime_ns": 5}
    assert not _converted(tmp_path, stamp)  # nothing converted yet
    (tmp_path / "config.json").write_text(json.dumps({"format": "mixattn/1", **stamp}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert _converted(tmp_path, stamp)
    assert not _converted(tmp_path, {**stamp, "source_size": 11})  # reinstalled / upgraded package
    assert not _converted(tmp_path, {**stamp, "source_mtime_ns": 6})
    (tmp_path / "config.json").write_text(json.dumps({"format": "mixattn/1", "source": stamp["source"]}))
    assert not _converted(tmp_path, stamp)  # a copy from before the stamp existed is redone


def test_another_install_of_the_same_bytes_reuses_the_conversion_and_other_bytes_do_not(tmp_path):
    """Two virtual environments share the cache: the same GGUF at another path (another mtime) is
    recognised by its digest instead of being converted again, in turn, by each environment."""
    from mixattn.paths import content_digest

    (tmp_path / "venv_a").mkdir()
    (tmp_path / "venv_b").mkdir()
    a, b = tmp_path / "venv_a" / "m.gguf", tmp_path / "venv_b" / "m.gguf"
    a.write_bytes(b"gguf bytes")
    b.write_bytes(b"gguf bytes")
    target = tmp_path / "conv"
    target.mkdir()
    stamp_a = {"source": str(a), "source_size": 10, "source_mtime_ns": a.stat().st_mtime_ns}
    (target / "config.json").write_text(json.dumps({**stamp_a, "source_digest": content_digest(a)}))
    (target / "model.safetensors").write_bytes(b"")
    stamp_b = {"source": str(b), "source_size": 10, "source_mtime_ns": a.stat().st_mtime_ns + 1}
    assert _converted(target, stamp_b, b)
    b.write_bytes(b"GGUF BYTES")  # same size, other bytes: an upgraded package
    assert not _converted(target, stamp_b, b)
    assert not _converted(target, stamp_b)  # without the file to read, only the exact stamp counts
