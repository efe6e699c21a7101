"""Synthetic long-context retrieval tasks with real text as the haystack (no downloads).

- passkey: a 5-digit key hidden at a relative depth inside filler text (Mohtashami & Jaggi 2023);
- multikey: several named keys hidden at different depths, one is asked for (needle-in-a-haystack);
- lines: LongEval-style line retrieval ("line <word>: REGISTER_CONTENT is <n>"), for strong models;
- passage: "answer about a distant passage": the prompt quotes an early sentence and asks for the
  words that followed it.

Every task is a ``Sample(prompt_ids, answer_ids, meta)``; generation is deterministic given a seed.
Prompts use the tokenizer's chat template when it has one (instruction-tuned models), plain text
otherwise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

NAMES = ["alpha", "bravo", "cedar", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "juniper"]


@dataclass
class Sample:
    prompt_ids: list[int]
    answer_ids: list[int]
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


def _wrap(tok, context: str, question: str, prefix: str = "") -> str:
    """The prompt: context and question as the user turn, ``prefix`` opening the model's answer."""
    chat = getattr(getattr(tok, "tok", None), "chat_template", None)
    if chat:
        msg = [{"role": "user", "content": f"{context}\n\n{question}"}]
        return tok.tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False) + prefix
    return f"{context}\n\n{question}\n{prefix}"


def _filler(haystack: np.ndarray, tok, n_tokens: int, rng: random.Random) -> list[int]:
    """``n_tokens`` of real text taken from a random offset of a token stream."""
    if len(haystack) < n_tokens + 1:
        raise ValueError(f"haystack has {len(haystack)} tokens; a {n_tokens}-token context needs more text")
    start = rng.randrange(0, len(haystack) - n_tokens)
    return [int(t) for t in haystack[start : start + n_tokens]]


def _build(tok, haystack, length, needles, question: str, prefix: str, answer: str, rng, meta):
    """Fill to about ``length`` prompt tokens with the needle sentences at their relative depths."""
    overhead = len(tok.encode(_wrap(tok, "", question, prefix))) + sum(len(tok.encode(s)) + 2 for _, s in needles)
    body = _filler(haystack, tok, max(16, length - overhead), rng)
    cuts = sorted((int(d * len(body)), s) for d, s in needles)
    pieces, last = [], 0
    for cut, sentence in cuts:
        pieces += [tok.decode(body[last:cut]), f" {sentence} "]
        last = cut
    pieces.append(tok.decode(body[last:]))
    prompt = tok.encode(_wrap(tok, "".join(pieces), question, prefix))
    return Sample(prompt, tok.encode(" " + answer), {**meta, "length": len(prompt)})


GARDEN = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there. ")  # fmt: skip


def passkey(tok, haystack, length: int, depth: float, seed: int) -> Sample:
    """The classic passkey test (Mohtashami & Jaggi 2023): repetitive filler, one key. ``haystack``
    is unused; real-text haystacks are in ``multikey`` and ``passage``."""
    rng = random.Random(seed)
    key = str(rng.randrange(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question, prefix = "What is the pass key?", "The pass key is"
    overhead = len(tok.encode(_wrap(tok, INTRO + needle, question, prefix))) + 4
    per = len(tok.encode(GARDEN))
    n = max(1, (length - overhead) // per)
    at = round(depth * n)
    context = INTRO + GARDEN * at + needle + " " + GARDEN * (n - at)
    prompt = tok.encode(_wrap(tok, context, question, prefix))
    return Sample(prompt, tok.encode(" " + key), {"task": "passkey", "depth": depth, "target": length,
                                                  "length": len(prompt)})  # fmt: skip


def multikey(tok, haystack, length: int, depth: float, seed: int, keys: int = 4) -> Sample:
    rng = random.Random(seed)
    names = rng.sample(NAMES, keys)
    values = [str(rng.randrange(10000, 99999)) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    needles = [(d, f"The pass key for {n} is {v}.") for d, n, v in zip(depths, names, values)]
    q, prefix = f"What is the pass key for {names[0]}?", f"The pass key for {names[0]} is"
    return _build(tok, haystack, length, needles, q, prefix, values[0], rng,
                  {"task": "multikey", "depth": depth, "target": length})  # fmt: skip


def lines(tok, haystack, length: int, depth: float, seed: int) -> Sample:
    """LongEval line retrieval: many "line <name>: REGISTER_CONTENT is <n>" lines, one asked for."""
    rng = random.Random(seed)
    per_line = len(tok.encode("line abcdefgh: REGISTER_CONTENT is <12345>\n"))
    n = max(2, (length - 40) // per_line)
    labels = [f"{rng.choice(NAMES)}-{rng.randrange(1000)}" for _ in range(n)]
    values = [str(rng.randrange(10000, 99999)) for _ in range(n)]
    pick = min(n - 1, int(depth * n))
    context = "".join(f"line {a}: REGISTER_CONTENT is <{v}>\n" for a, v in zip(labels, values))
    q = f"What is the <REGISTER_CONTENT> in line {labels[pick]}?"
    prompt = tok.encode(_wrap(tok, context, q, "The REGISTER_CONTENT is <"))
    return Sample(prompt, tok.encode(values[pick]), {"task": "lines", "depth": depth, "target": length,
                                                     "length": len(prompt)})  # fmt: skip


def passage(tok, haystack, length: int, depth: float, seed: int, quote: int = 12, answer: int = 8) -> Sample:
    """Quote ``quote`` tokens from the context at ``depth`` and ask for the ``answer`` tokens after them."""
    rng = random.Random(seed)
    q_probe = _wrap(tok, "", "Which words come right after this passage: ''?", "They are:")
    body = _filler(haystack, tok, max(64, length - len(tok.encode(q_probe)) - quote - 8), rng)
    at = min(len(body) - quote - answer - 1, int(depth * len(body)))
    quoted, follow = tok.decode(body[at : at + quote]), body[at + quote : at + quote + answer]
    question = f"Which words come right after this passage: '{quoted}'?"
    prompt = tok.encode(_wrap(tok, tok.decode(body), question, "They are:"))
    return Sample(prompt, follow, {"task": "passage", "depth": depth, "target": length, "length": len(prompt)})


TASKS = {"passkey": passkey, "multikey": multikey, "lines": lines, "passage": passage}


def make(task: str, tok, haystack, length: int, depth: float, seed: int) -> Sample:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[task](tok, haystack, length, depth, seed)
