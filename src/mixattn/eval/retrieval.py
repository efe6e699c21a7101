"""Retrieval scoring of one ``Sample`` (RULER convention).

- Primary: greedy generation of up to ``max_new_tokens`` tokens after the prompt, stopped at a stop
  token (EOS); correct iff the generated text contains every answer string (``is_hit``).
- Secondary: the log-probability of the answer's content tokens given the context, where context and
  answer were tokenized as one string (``Sample.context_ids + Sample.answer_ids``), so whitespace
  before the answer is context and not scored.

Both use the same reference length N = prompt + ``max_new_tokens`` for sparse plans (the cache is
sized once, as in generation). The prompt is prefilled once: the log-probability teacher-forces the
answer through a copy of the prefilled cache, one decode step per token.
"""

from __future__ import annotations

import copy

import torch

from ..compress.calibration import greedy_steps, step_logits
from ..data.tasks import Sample, is_hit


@torch.no_grad()
def score(model, tok, sample: Sample, max_new_tokens: int = 16, stop_tokens=None) -> dict:
    """Generation hit, generated text and answer log-probability of one sample.

    Returns {"hit": bool, "generated": str, "logprob": float (sum over the A content tokens),
    "answer_tokens": A, "ref_len": N}.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_tokens is None:
        eos = getattr(tok, "eos_token_id", None)
        stop_tokens = () if eos is None else (int(eos),)
    was_training = model.training
    model.eval()
    P = len(sample.prompt_ids)
    joint = sample.context_ids + sample.answer_ids
    C = len(sample.context_ids)
    N = P + max(max_new_tokens, len(joint) - P)  # plans see one reference length for both scores
    cache = model.new_cache(N)
    first = model(torch.tensor([sample.prompt_ids]), cache, ref_len=N, logits_to_keep=1).logits[0, -1].float()

    if joint[:P] == sample.prompt_ids and C >= P:  # teacher-force the rest of the joint string
        tf_cache, logits, lp = copy.deepcopy(cache), first, 0.0
        for t in range(P, len(joint)):
            if t >= C:
                lp += float(torch.log_softmax(logits, -1)[joint[t]])
            if t + 1 < len(joint):
                logits = step_logits(model, joint[t], tf_cache, t, N)
        del tf_cache
    else:  # the tokenizer merged prompt and answer differently: one full forward over the joint string
        all_logits = model(torch.tensor([joint[:-1]]), ref_len=N).logits[0].float()
        lps = torch.log_softmax(all_logits[C - 1 :], -1)
        lp = float(lps.gather(-1, torch.tensor(sample.answer_ids)[:, None]).sum())

    out = list(greedy_steps(model, first, cache, P, N, max_new_tokens, stop_tokens))
    model.train(was_training)
    text = tok.decode(out)
    return {"hit": is_hit(text, sample.answers), "generated": text, "logprob": lp,
            "answer_tokens": len(sample.answer_ids), "ref_len": N}  # fmt: skip
