"""Argument types for the command line: each parses one value or raises ``argparse.ArgumentTypeError``
with a message that says what was expected, so a bad flag fails at once, before any work, with a
one-line error naming the flag (argparse adds the flag's name)."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _at_least(kind, low, strict: bool = False, name: str = ""):
    """A type for numbers of ``kind`` that are >= ``low`` (> ``low`` when ``strict``)."""

    def parse(text: str):
        value = _number(text, kind)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {value}")
        return value

    parse.__name__ = name
    return parse


positive_int = _at_least(int, 1, name="positive_int")  # counts, sizes, lengths
nonneg_int = _at_least(int, 0, name="nonneg_int")  # seeds, warm-up steps
positive_float = _at_least(float, 0, strict=True, name="positive_float")  # learning rates
nonneg_float = _at_least(float, 0, name="nonneg_float")  # coefficients, temperatures


def fraction(text: str) -> float:
    """A number in (0, 1]: a density or a share."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """Comma-separated integers, each >= 1 (lengths)."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    values = tuple(positive_int(p) for p in parts)
    return values


def unit_floats(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, each in [0, 1] (relative depths)."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    values = tuple(_number(p, float) for p in parts)
    bad = [v for v in values if not 0 <= v <= 1]
    if bad:
        raise argparse.ArgumentTypeError(f"each value must be in [0, 1], got {bad[0]}")
    return values


def baseline_spec(text: str) -> tuple[str, float]:
    """``KIND:DENSITY``, e.g. ``uniform:0.5``."""
    kind, sep, d = text.partition(":")
    kinds = ("uniform", "duo", "dense")
    if not sep or kind not in kinds:
        raise argparse.ArgumentTypeError(f"expected KIND:DENSITY with KIND in {', '.join(kinds)}, got {text!r}")
    try:
        return kind, fraction(d)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: density {e}") from None


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise ``UsageError`` (one line, exit status 2 in ``cli.main``)
    instead of printing the usage block and exiting from inside the parser."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class UsageError(ValueError):
    """A bad command line."""


def checked_text(parse):
    """A type that validates with ``parse`` but keeps the flag's text as given (for commands that parse it later)."""

    def check(text: str) -> str:
        parse(text)
        return text

    check.__name__ = parse.__name__
    return check


def fractions(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, each in (0, 1] (densities)."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in (0, 1], got {text!r}")
    return tuple(fraction(p) for p in parts)
