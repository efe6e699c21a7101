"""Tokenizers: HF tokenizers (from tokenizer.json or a GGUF) behind the small interface the data
pipeline uses (``name``, ``vocab_size``, ``encode``, ``decode``), and the byte tokenizer for models
trained from scratch."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256), for models trained from scratch."""

    name = "bytes"
    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps({"mixattn_tokenizer": "bytes"}))


class HFTokenizer:
    """Wraps a ``transformers`` tokenizer; ``name`` is a hash of its vocabulary (for data caches)."""

    def __init__(self, tok):
        self.tok = tok
        vocab = json.dumps(sorted(tok.get_vocab().items())).encode()
        self.name = "hf-" + hashlib.sha256(vocab).hexdigest()[:12]
        self.vocab_size = len(tok)
        self.eos_token_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory))


def load_tokenizer_dir(directory: Path):
    """The tokenizer saved in a checkpoint directory: HF files, or the byte tokenizer marker (default)."""
    directory = Path(directory)
    cfg = directory / "tokenizer_config.json"
    if (directory / "tokenizer.json").is_file() or (cfg.is_file() and "mixattn_tokenizer" not in cfg.read_text()):
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(directory)))
    return ByteTokenizer()


def load_gguf_tokenizer(path: Path) -> HFTokenizer:
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
