"""Rewards for the synthetic tasks in `gspo.data` (the tiny CPU recipes and the demo)."""

from __future__ import annotations

import re

from gspo.rewards import register_reward

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _text(completion) -> str:
    # Conversational completions arrive as [{"role": "assistant", "content": ...}].
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion)
    return completion


def extract_answer(text: str) -> str | None:
    """The last `<answer>...</answer>` span, stripped; None when there is none.

    >>> extract_answer("<think>2+2=4</think><answer> 4 </answer>")
    '4'
    >>> extract_answer("4") is None
    True
    """
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


@register_reward("synthetic_accuracy")
def synthetic_accuracy(prompts, completions, completion_ids=None, *, answer, **_):
    """1.0 when the answer in the tags equals the `answer` column exactly, else 0.0.

    >>> synthetic_accuracy(["What is 2+3?"] * 3, ["<answer>5</answer>", "<answer>6</answer>", "5"], answer=["5"] * 3)
    [1.0, 0.0, 0.0]
    """
    return [1.0 if extract_answer(_text(c)) == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


@register_reward("synthetic_format")
def synthetic_format(prompts, completions, completion_ids=None, **_):
    """1.0 when the whole completion is an optional think block followed by one answer block.

    >>> synthetic_format(["p"] * 3, ["<think>x</think><answer>5</answer>", "<answer>5</answer> extra", "5"])
    [1.0, 0.0, 0.0]
    """
    pattern = re.compile(r"^(<think>[^<]*</think>)?<answer>[^<]*</answer>$")
    return [1.0 if pattern.match(_text(c).strip()) else 0.0 for c in completions]


@register_reward("synthetic_concise")
def synthetic_concise(prompts, completions, completion_ids=None, **_):
    """1.0 when the completion has an answer block and no think block (the `add_concise` preference), else 0.0.

    >>> synthetic_concise(["p"] * 3, ["<answer>5</answer>", "<think>2+3=5</think><answer>5</answer>", "5"])
    [1.0, 0.0, 0.0]
    """
    return [1.0 if extract_answer(_text(c)) is not None and "<think>" not in _text(c) else 0.0 for c in completions]
