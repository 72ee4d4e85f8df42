"""Length rewards: DAPO's soft overlong punishment, cosine length scaling, n-gram repetition penalty."""

from __future__ import annotations

import math
from typing import Any

from gspo.rewards import completion_text, register_reward

from .math import score as math_score


def soft_overlong(length: int, max_length: int, cache_length: int) -> float:
    """DAPO (Yu et al. 2025, Eq. 13): 0 up to L_max - L_cache, then linear down to -1 at L_max, -1 beyond.

    >>> [soft_overlong(n, 100, 20) for n in (50, 80, 90, 100, 101)]
    [0.0, 0.0, -0.5, -1.0, -1.0]
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"overlong_penalty: need 0 < cache_length ({cache_length}) <= max_length ({max_length})")
    start = max_length - cache_length
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / cache_length
    return -1.0


def _lengths(completion_ids: Any, completions: list[Any]) -> list[int]:
    if completion_ids is None:
        raise ValueError("length rewards need completion_ids (token counts), got None")
    return [len(ids) for ids in completion_ids]


@register_reward("overlong_penalty")
def overlong_penalty(prompts, completions, completion_ids, *, max_length: int, cache_length: int, **_):
    """DAPO soft overlong punishment on the completion's token count (`max_length`, `cache_length` in tokens).

    >>> overlong_penalty(["p"] * 3, ["a", "b", "c"], [[1] * 5, [1] * 9, [1] * 12], max_length=10, cache_length=4)
    [0.0, -0.75, -1.0]
    """
    return [soft_overlong(n, max_length, cache_length) for n in _lengths(completion_ids, completions)]


def cosine_scale(length: int, max_length: int, r0: float, r_l: float) -> float:
    """Yeo et al. 2025 ("Demystifying Long CoT"), CosFn: r_L + (r_0 - r_L)(1 + cos(pi * L / L_max)) / 2,
    i.e. r_0 at length 0 and r_L at max_length.

    >>> cosine_scale(0, 100, 1.0, 0.5), cosine_scale(100, 100, 1.0, 0.5), cosine_scale(50, 100, 1.0, 0.5)
    (1.0, 0.5, 0.75)
    """
    length = min(length, max_length)
    return r_l + 0.5 * (r0 - r_l) * (1.0 + math.cos(math.pi * length / max_length))


@register_reward("cosine_length")
def cosine_length(
    prompts, completions, completion_ids, *, max_length: int, answer_column: str = "answer",
    correct_short: float = 1.0, correct_long: float = 0.5, wrong_short: float = -1.0, wrong_long: float = -0.5,
    exceed_penalty: float = -1.0, timeout_s: int = 5, **columns,
):
    """Correctness (math-verify against the `answer` column) scaled by length: among correct answers shorter
    earns more, among wrong ones longer is penalized less (keeps exploring); beyond max_length:
    `exceed_penalty`. None when the gold is unparseable. Defaults are the paper's scaled to [-1, 1].

    >>> short_right, long_right, short_wrong = cosine_length(
    ...     ["q"] * 3, ["\\\\boxed{4}", "\\\\boxed{4}", "\\\\boxed{5}"], [[1] * 10, [1] * 90, [1] * 10],
    ...     max_length=100, answer=["4"] * 3)
    >>> short_right > long_right > 0 > short_wrong
    True
    """
    golds = columns[answer_column]
    out: list[float | None] = []
    for gold, completion, n in zip(golds, completions, _lengths(completion_ids, completions)):
        correct = math_score(gold, completion, timeout_s)
        if correct is None:
            out.append(None)
        elif n >= max_length:
            out.append(exceed_penalty)
        elif correct:
            out.append(cosine_scale(n, max_length, correct_short, correct_long))
        else:
            out.append(cosine_scale(n, max_length, wrong_short, wrong_long))
    return out


cosine_length.__reward_columns__ = lambda kwargs: [kwargs.get("answer_column", "answer")]


def repetition_fraction(text: str, ngram_size: int = 3) -> float:
    """Share of repeated word n-grams: 1 - distinct / total (0 for texts shorter than one n-gram).

    >>> repetition_fraction("a b c d e"), repetition_fraction("go go go go go")
    (0.0, 0.6666666666666667)
    """
    words = text.lower().split()
    ngrams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
    return 1.0 - len(set(ngrams)) / len(ngrams) if ngrams else 0.0


@register_reward("repetition_penalty")
def repetition_penalty(prompts, completions, completion_ids=None, *, ngram_size: int = 3,
                       max_penalty: float = -1.0, **_):
    """`max_penalty` times the share of repeated word n-grams (Yeo et al. 2025's n-gram repetition penalty).

    >>> repetition_penalty(["p"] * 2, ["the cat sat on the mat", "so so so so so so"])
    [-0.0, -0.75]
    """
    if max_penalty > 0:
        raise ValueError(f"repetition_penalty: max_penalty must be <= 0, got {max_penalty}")
    return [max_penalty * repetition_fraction(completion_text(c), ngram_size) for c in completions]
