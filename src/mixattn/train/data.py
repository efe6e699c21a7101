"""Moved to ``mixattn.data.corpora``; this name stays importable for existing code."""

from ..data.corpora import ByteTokenizer, TokenData, corpus_files, corpus_tokens, load_corpus  # noqa: F401
