"""Synthetic long-context retrieval tasks over real text (no downloads), in the RULER format.

- ``passkey``: one 7-digit key hidden at a relative depth in real text (Mohtashami & Jaggi 2023);
- ``multikey``: RULER's multi-key needle-in-a-haystack: the asked key plus 3 distractor keys, each a
  "special magic number" for a different word, at random depths;
- ``multivalue``: RULER's multi-value NIAH: 4 numbers for the same word; all must be returned;
- ``vartrack``: RULER's variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops)
  spread through the text; every variable holding the value must be named;
- ``lines``: LongEval line retrieval (Li et al. 2023, the benchmark MoA reports): numbered
  ``line <label>: REGISTER_CONTENT is <n>`` records; the value of one line is asked for;
- ``passage``: "which words follow this quoted passage" (used for calibration).

Each prompt has its own seed, hence its own keys, filler offset and distractors. The haystack is a
token stream of real text (Shakespeare or the stdlib source); prompts use the tokenizer's chat
template when it has one. The prompt's length is fitted to ``length`` tokens within 0.5%.

A ``Sample`` carries both scoring views:

- ``context_ids + answer_ids`` is the prompt and the answer tokenized as ONE string, split where the
  answer's content starts, so that the separating whitespace belongs to the context side and the
  log-probability covers content tokens only;
- ``prompt_ids`` is that same context: the answer prefix ("... The pass key is") plus the separating
  whitespace where the tokenizer makes it a token of its own (SmolLM2's does: " 1234567" is a bare
  space then one token per digit); the prompt's own tokens where a token straddles the boundary.
  Greedy generation from it is correct when the generated text contains every string in ``answers``
  (RULER's convention). Stopping before the space would score whether the model emits a lone space
  token first, not whether it retrieves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORDS = ("alpha bravo cedar delta ember falcon garnet harbor indigo juniper kettle lantern meadow nectar "
         "orchid pepper quartz raven saffron tundra umber velvet willow xenon yarrow zephyr anchor basalt "
         "cobalt dune ermine fjord glacier heron iris jasper kelp lotus marble nimbus").split()  # fmt: skip
NEEDLE_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                "them. I will quiz you about the numbers afterwards.\n")  # fmt: skip


@dataclass
class Sample:
    prompt_ids: list[int]  # (P,) the generation prompt, ending with the answer prefix
    answers: tuple[str, ...]  # every one must appear in the generated text
    context_ids: list[int]  # (C,) joint tokenization up to the answer's first content character
    answer_ids: list[int]  # (A,) joint tokenization of the answer's content
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.prompt_ids)


def _wrap(tok, context: str, question: str, prefix: str) -> str:
    """The prompt text: context and question as the user turn, ``prefix`` opening the model's answer."""
    chat = getattr(getattr(tok, "tok", None), "chat_template", None)
    if chat:
        msg = [{"role": "user", "content": f"{context}\n\n{question}"}]
        return tok.tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False) + prefix
    return f"{context}\n\n{question}\n{prefix}"


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def make_sample(tok, prompt: str, answers, continuation: str, meta: dict) -> Sample:
    """Tokenize ``prompt`` (generation) and ``prompt + continuation`` as one string (log-probability).

    ``continuation`` is the gold answer as it would follow the prompt, e.g. ``" 1234567"``; its leading
    whitespace is put on the context side whenever the tokenizer allows it.
    """
    content = continuation.lstrip()
    joint = tok.encode(prompt + continuation)
    ws = tok.encode(prompt + continuation[: len(continuation) - len(content)])
    k0 = _common(joint, ws)  # tokens before the first one that carries answer content
    if k0 >= len(joint):
        raise ValueError(f"answer {continuation!r} adds no tokens to the prompt")
    # generation starts from the same context (module docstring: why the separating space is prompt)
    plain = tok.encode(prompt)
    extends = k0 >= len(plain) and joint[: len(plain)] == plain  # else a token straddles the boundary: keep the prompt whole
    return Sample(joint[:k0] if extends else plain, tuple(answers), joint[:k0], joint[k0:], meta)


def _filler(haystack, n_tokens: int, start: int) -> list[int]:
    return [int(t) for t in haystack[start : start + n_tokens]]


def _snap(tok, body: list[int], cut: int, reach: int = 48) -> int:
    """Move a cut forward to just after a line or sentence end, so needles do not split words."""
    for c in range(cut, min(len(body), cut + reach)):
        text = tok.decode(body[c - 1 : c]) if c > 0 else "\n"
        if text.endswith(("\n", ".", "!", "?", ";")):
            return c
    return cut


def _fit(render, target: int, first_guess: int, what: str) -> list[int]:
    """Grow or shrink the filler (``render(n_filler) -> ids``) until the prompt is within 0.5% of ``target``."""
    n, tol, best = max(0, first_guess), max(1, target // 200), None
    for _ in range(8):
        ids = render(n)
        err = target - len(ids)
        if best is None or abs(err) < abs(target - len(best)):
            best = ids
        if abs(err) <= tol:
            return ids
        n = max(0, n + err)
    if abs(target - len(best)) <= target // 100:
        return best
    raise ValueError(f"{what}: could not fit the prompt to {target} tokens (got {len(ids)}); is the length too short?")


def _haystack_start(haystack, length: int, rng) -> int:
    """A random offset with room for a ``length``-token prompt (and the fitting's slack) after it."""
    if len(haystack) < 2 * length + 64:
        raise ValueError(f"haystack has {len(haystack)} tokens; a {length}-token prompt needs at least {2 * length + 64}")
    return rng.randrange(0, len(haystack) - 2 * length - 32)


def _haystack_prompt(tok, haystack, length: int, needles, question: str, prefix: str, rng, what: str) -> str:
    """Real text of about ``length`` prompt tokens with ``needles`` [(depth, sentence)] inserted."""
    overhead = len(tok.encode(_wrap(tok, NEEDLE_INTRO, question, prefix))) + sum(len(tok.encode(s)) + 2 for _, s in needles)
    start = _haystack_start(haystack, length, rng)
    text = {}

    def render(n):
        body = _filler(haystack, n, start)
        cuts = sorted((_snap(tok, body, int(d * n)), s) for d, s in needles)
        pieces, last = [], 0
        for cut, sentence in cuts:
            pieces += [tok.decode(body[last:cut]), f" {sentence} "]
            last = cut
        pieces.append(tok.decode(body[last:]))
        text["prompt"] = _wrap(tok, NEEDLE_INTRO + "".join(pieces), question, prefix)
        return tok.encode(text["prompt"])

    _fit(render, length, length - overhead, what)
    return text["prompt"]


def _number(rng, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def passkey(tok, haystack, length: int, depth: float, seed: int) -> Sample:
    rng = random.Random(seed)
    key = _number(rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    q, prefix = "What is the pass key?", "The pass key is"
    prompt = _haystack_prompt(tok, haystack, length, [(depth, needle)], q, prefix, rng, "passkey")
    return make_sample(tok, prompt, [key], " " + key, {"task": "passkey", "depth": depth, "key": key})


def multikey(tok, haystack, length: int, depth: float, seed: int, keys: int = 4) -> Sample:
    """The asked key at ``depth``, ``keys - 1`` distractors (other words, other numbers) at random depths."""
    rng = random.Random(seed)
    names = rng.sample(WORDS, keys)
    values = [_number(rng) for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    needles = [(d, f"One of the special magic numbers for {n} is: {v}.") for d, n, v in zip(depths, names, values)]
    q = f"What is the special magic number for {names[0]} mentioned in the provided text?"
    prefix = f"The special magic number for {names[0]} mentioned in the provided text is"
    prompt = _haystack_prompt(tok, haystack, length, needles, q, prefix, rng, "multikey")
    return make_sample(tok, prompt, [values[0]], " " + values[0],
                       {"task": "multikey", "depth": depth, "key": values[0], "distractors": values[1:]})  # fmt: skip


def multivalue(tok, haystack, length: int, depth: float, seed: int, values: int = 4) -> Sample:
    """``values`` numbers for one word, the first at ``depth``, the rest at random depths; all are asked for."""
    rng = random.Random(seed)
    name = rng.choice(WORDS)
    nums = [_number(rng) for _ in range(values)]
    depths = [depth] + [rng.random() for _ in nums[1:]]
    needles = [(d, f"One of the special magic numbers for {name} is: {v}.") for d, v in zip(depths, nums)]
    q = f"What are all the special magic numbers for {name} mentioned in the provided text?"
    prefix = f"The special magic numbers for {name} mentioned in the provided text are"
    prompt = _haystack_prompt(tok, haystack, length, needles, q, prefix, rng, "multivalue")
    order = [v for _, v in sorted(zip(depths, nums))]
    return make_sample(tok, prompt, nums, " " + ", ".join(order), {"task": "multivalue", "depth": depth, "key": nums})


def vartrack(tok, haystack, length: int, depth: float, seed: int, hops: int = 4) -> Sample:
    """A chain of ``hops`` assignments from a value, starting at ``depth``, the rest spread after it."""
    rng = random.Random(seed)
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    while len(set(names)) < len(names):
        names[-1] = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
    value = _number(rng, 5)
    stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = [depth + (1 - depth) * i / (hops + 1) for i in range(hops + 1)]
    q = f"Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
              f"are assigned the value {value}, they are:")  # fmt: skip
    prompt = _haystack_prompt(tok, haystack, length, list(zip(depths, stmts)), q, prefix, rng, "vartrack")
    return make_sample(tok, prompt, names, " " + " ".join(names), {"task": "vartrack", "depth": depth, "key": names})


def lines(tok, haystack, length: int, depth: float, seed: int) -> Sample:
    """LongEval: records ``line <word>-<word>: REGISTER_CONTENT is <n>``; the one at ``depth`` is asked
    for. The last partial line's worth of tokens is a quotation from the haystack before the records."""
    rng = random.Random(seed)
    q_line = "line {}: REGISTER_CONTENT is <{}>\n"
    per = len(tok.encode(q_line.format("alpha-bravo", "1234567")))
    n = max(2, length // per + 2)
    labels, seen = [], set()
    while len(labels) < n:
        lab = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        if lab not in seen:
            seen.add(lab)
            labels.append(lab)
    values = [_number(rng) for _ in labels]
    start = rng.randrange(0, max(1, len(haystack) - 4 * per))
    text = {}

    def render(m, quote=0):
        pick = min(m - 1, int(depth * m))
        quoted = tok.decode(_filler(haystack, quote, start))
        head = f"Below is a record of lines I want you to remember, after a quotation: {quoted}"
        ctx = head + "\n" + "".join(q_line.format(a, v) for a, v in zip(labels[:m], values[:m]))
        q = f"Tell me what is the <REGISTER_CONTENT> in line {labels[pick]}? I need the number."
        text.update(prompt=_wrap(tok, ctx, q, f"The <REGISTER_CONTENT> in line {labels[pick]} is <"), pick=pick)
        return tok.encode(text["prompt"])

    lo, hi = 2, n  # the most lines that fit
    if len(render(lo)) > length:
        raise ValueError(f"lines: length {length} is too short for two records")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(render(mid)) <= length else (lo, mid - 1)
    render(lo)
    if length - len(tok.encode(text["prompt"])) > max(1, length // 200):
        _fit(lambda k: render(lo, k), length, length - len(tok.encode(text["prompt"])), "lines")
    key = values[text["pick"]]
    return make_sample(tok, text["prompt"], [key], key,
                       {"task": "lines", "depth": depth, "key": key, "records": lo})  # fmt: skip


def passage(tok, haystack, length: int, depth: float, seed: int, quote: int = 12, answer: int = 8) -> Sample:
    """Quote ``quote`` tokens of the context at ``depth`` and ask for the ``answer`` tokens after them."""
    rng = random.Random(seed)
    start = _haystack_start(haystack, length, rng)
    text = {}

    def render(n):
        body = _filler(haystack, n, start)
        at = max(0, min(n - quote - answer - 1, int(depth * n)))
        quoted = tok.decode(body[at : at + quote])
        text.update(follow=tok.decode(body[at + quote : at + quote + answer]))
        q = f"Which words come right after this passage: '{quoted}'?"
        text["prompt"] = _wrap(tok, tok.decode(body), q, "They are:")
        return tok.encode(text["prompt"])

    _fit(render, length, length - 64, "passage")
    follow = text["follow"].strip() or text["follow"]
    return make_sample(tok, text["prompt"], [follow], " " + follow, {"task": "passage", "depth": depth, "key": follow})


TASKS = {"passkey": passkey, "multikey": multikey, "multivalue": multivalue, "vartrack": vartrack,
         "lines": lines, "passage": passage}  # fmt: skip
MAX_NEW_TOKENS = {"passkey": 16, "multikey": 16, "multivalue": 48, "vartrack": 40, "lines": 16, "passage": 16}


def make(task: str, tok, haystack, length: int, depth: float, seed: int) -> Sample:
    """One prompt of ``length`` tokens (within 0.5%) with its needle at relative ``depth`` in [0, 1]."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    s = TASKS[task](tok, haystack, length, depth, seed)
    s.meta.update(target=length, length=len(s.prompt_ids), seed=seed)
    return s


def prompt_seed(task: str, length: int, depth: float, index: int, base: int = 0) -> int:
    """A distinct, reproducible seed per prompt (task, length, depth, index)."""
    import zlib

    return zlib.crc32(f"{base}|{task}|{length}|{depth:.4f}|{index}".encode())


def is_hit(generated: str, answers) -> bool:
    """True iff every answer string occurs in ``generated`` (RULER's string-match metric)."""
    if not answers:
        raise ValueError("answers must list at least one string")
    return all(a in generated for a in answers)
