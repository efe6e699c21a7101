"""Retrieval scoring. One forward over prompt + gold answer gives both metrics:

- teacher-forced accuracy: the share of answer tokens that are the argmax given the gold prefix;
- exact match of greedy generation: all answer tokens are the argmax, which is exactly the condition
  for greedy decoding to emit the answer (each greedy step sees the same prefix as teacher forcing).

The reference length N for sparse plans is prompt + answer + ``slack`` (as when generating).
"""

from __future__ import annotations

import torch

from .tasks import Sample


@torch.no_grad()
def score(model, sample: Sample, slack: int = 8) -> tuple[bool, float]:
    ids = torch.tensor(sample.prompt_ids + sample.answer_ids)[None]
    n = len(sample.answer_ids)
    logits = model(ids[:, :-1], ref_len=ids.shape[1] + slack).logits[0, -n:]
    hits = logits.argmax(-1) == ids[0, -n:]
    return bool(hits.all()), float(hits.float().mean())
