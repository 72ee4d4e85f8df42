"""Math accuracy with math-verify: LaTeX, \\boxed{} and plain-number answers.

Traps this module closes (each has a test):
- an unparseable gold answer abstains (None) instead of scoring 1.0 or 0.0 (both teach the policy noise);
- math-verify's `verify(gold, prediction)` is not symmetric (intervals vs inequalities, assignments): the gold
  is always passed first;
- each distinct gold string is parsed once (cached), not once per completion;
- verification runs under math-verify's own time-out (signal based, so only in the main thread; elsewhere
  it runs without one and the spec's `timeout_s` bounds the whole function).
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any

from gspo.rewards import completion_text, register_reward

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2,}")


def _timeout(seconds: int) -> int | None:
    # math-verify uses signal.alarm, which raises in any thread but the main one.
    return seconds if threading.current_thread() is threading.main_thread() and seconds > 0 else None


def _parse(text: str, timeout_s: int) -> list[Any]:
    """math-verify's parse; bare LaTeX without delimiters ("x^2+1", "(1,2)") is retried inside $...$, unless
    it is words ("banana" would otherwise become the product b*a*n*a*n*a)."""
    from math_verify import parse

    parsed = parse(text, parsing_timeout=_timeout(timeout_s))
    if not parsed and text.strip() and not _WORD.search(_LATEX_COMMAND.sub("", text)):
        parsed = parse(f"${text.strip()}$", parsing_timeout=_timeout(timeout_s))
    return parsed


@functools.lru_cache(maxsize=65536)
def parse_gold(gold: str, timeout_s: int = 5) -> tuple[Any, ...] | None:
    """Parse a gold answer once (cached per distinct string); None when it cannot be parsed.

    >>> parse_gold("\\\\frac{1}{2}") is not None, parse_gold("banana")
    (True, None)
    """
    from math_verify import parse

    gold = str(gold).strip()
    parsed: list[Any] = []
    # A bare gold like "1<x<2" is read by the plain-expression extractor as just "1": parse bare math
    # (no delimiters, no words) as LaTeX first.
    delimited = any(mark in gold for mark in ("$", "\\(", "\\[", "\\boxed"))
    if gold and not delimited and not _WORD.search(_LATEX_COMMAND.sub("", gold)):
        parsed = parse(f"${gold}$", parsing_timeout=_timeout(timeout_s))
    if not parsed:
        parsed = _parse(gold, timeout_s)
    return tuple(parsed) if parsed else None


def parse_prediction(text: str, timeout_s: int = 5) -> list[Any]:
    """The completion's final answer: \\boxed{} / LaTeX / a number anywhere, else the last <answer> span."""
    parsed = _parse(text, timeout_s) if "<answer>" not in text else []
    if not parsed:
        spans = _ANSWER_TAG.findall(text)
        if spans:
            parsed = _parse(spans[-1], timeout_s)
    return parsed


def verify_answer(gold: tuple[Any, ...], prediction: list[Any], timeout_s: int = 5) -> bool:
    """math-verify with the gold FIRST (the comparison is not symmetric)."""
    from math_verify import verify

    return bool(prediction) and verify(list(gold), prediction, timeout_seconds=_timeout(timeout_s))


def score(gold: Any, completion: Any, timeout_s: int = 5) -> float | None:
    """1.0 / 0.0 for one completion, None when the gold cannot be parsed."""
    if gold is None:
        return None
    parsed_gold = parse_gold(str(gold), timeout_s)
    if parsed_gold is None:
        return None
    return 1.0 if verify_answer(parsed_gold, parse_prediction(completion_text(completion), timeout_s), timeout_s) else 0.0


@register_reward("math_accuracy")
def math_accuracy(
    prompts, completions, completion_ids=None, *, answer_column: str = "answer", timeout_s: int = 5, **columns
) -> list[float | None]:
    """1.0 when the completion's final answer equals the gold (column `answer`), 0.0 when not, None when the
    gold is unparseable.

    >>> math_accuracy(["q"] * 4, ["\\\\boxed{\\\\frac{1}{2}}", "so 0.5", "\\\\boxed{3}", "\\\\boxed{1}"],
    ...               answer=["1/2", "1/2", "1/2", "banana"])
    [1.0, 1.0, 0.0, None]
    """
    golds = columns[answer_column]
    return [score(g, c, timeout_s) for g, c in zip(golds, completions)]


math_accuracy.__reward_columns__ = lambda kwargs: [kwargs.get("answer_column", "answer")]
