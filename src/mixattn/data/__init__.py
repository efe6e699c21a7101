"""Data: offline corpora and token batches (``corpora``) and the synthetic long-context tasks with
their scoring rule (``tasks``). It sits between ``models`` and the packages that train, compress,
convert or evaluate, which all read data from here.

Tokenizers stay with the models (``mixattn.models.hf.tokenizer``): a model file carries its own
vocabulary, and loading a model must not depend on this layer. ``ByteTokenizer`` is re-exported.
"""

from ..models.hf.tokenizer import ByteTokenizer
from .corpora import TokenData, corpus_files, corpus_tokens, load_corpus

__all__ = ["ByteTokenizer", "TokenData", "corpus_files", "corpus_tokens", "load_corpus"]
