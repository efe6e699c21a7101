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
