"""Format rewards: reasoning / answer tags (configurable names), strict and soft, and tag-count shaping.

Defaults follow DeepSeek-R1's template: `<think> reasoning </think> <answer> answer </answer>`.
"""

from __future__ import annotations

import re

from gspo.rewards import completion_text, register_reward


def _tags(think_tag: str, answer_tag: str) -> list[str]:
    return [f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>"]


def is_strict_format(text: str, think_tag: str = "think", answer_tag: str = "answer") -> bool:
    """The whole completion is one think block then one answer block (whitespace around them allowed).

    >>> is_strict_format("<think>2+2 is 4</think>\\n<answer>4</answer>")
    True
    >>> is_strict_format("<think>x</think><answer>4</answer> trailing words")
    False
    """
    tags = _tags(think_tag, answer_tag)
    if any(text.count(tag) != 1 for tag in tags):
        return False
    t0, t1, a0, a1 = (re.escape(tag) for tag in tags)
    return re.fullmatch(rf"\s*{t0}.*?{t1}\s*{a0}.*?{a1}\s*", text, re.DOTALL) is not None


def is_soft_format(text: str, think_tag: str = "think", answer_tag: str = "answer") -> bool:
    """The four tags appear in order somewhere (other text around them allowed).

    >>> is_soft_format("sure! <think>x</think> so <answer>4</answer> done")
    True
    >>> is_soft_format("<answer>4</answer><think>x</think>")
    False
    """
    t0, t1, a0, a1 = (re.escape(tag) for tag in _tags(think_tag, answer_tag))
    return re.search(rf"{t0}.*?{t1}.*?{a0}.*?{a1}", text, re.DOTALL) is not None


def tag_score(text: str, think_tag: str = "think", answer_tag: str = "answer") -> float:
    """0.25 per tag that appears exactly once and after every earlier tag of the sequence (partial credit).

    >>> tag_score("<think>x</think><answer>4</answer>"), tag_score("<think>x</think> 4"), tag_score("4")
    (1.0, 0.5, 0.0)
    """
    credit, last = 0.0, -1
    for tag in _tags(think_tag, answer_tag):
        if text.count(tag) == 1:
            pos = text.index(tag)
            if pos > last:
                credit += 0.25
                last = pos
    return credit


@register_reward("format_strict")
def format_strict(prompts, completions, completion_ids=None, *, think_tag="think", answer_tag="answer", **_):
    """1.0 when the whole completion is `<think>...</think><answer>...</answer>`, else 0.0.

    >>> format_strict(["p"] * 2, ["<think>a</think><answer>b</answer>", "<answer>b</answer>"])
    [1.0, 0.0]
    """
    return [float(is_strict_format(completion_text(c), think_tag, answer_tag)) for c in completions]


@register_reward("format_soft")
def format_soft(prompts, completions, completion_ids=None, *, think_tag="think", answer_tag="answer", **_):
    """1.0 when the tags appear in order anywhere in the completion, else 0.0.

    >>> format_soft(["p"] * 2, ["ok <think>a</think> <answer>b</answer> bye", "<think>a</think>"])
    [1.0, 0.0]
    """
    return [float(is_soft_format(completion_text(c), think_tag, answer_tag)) for c in completions]


@register_reward("tag_count")
def tag_count(prompts, completions, completion_ids=None, *, think_tag="think", answer_tag="answer", **_):
    """Shaping: 0.25 per correctly placed tag, so partial formats get partial credit.

    >>> tag_count(["p"] * 3, ["<think>a</think><answer>b</answer>", "<think>a", "<reasoning>a</reasoning>"])
    [1.0, 0.25, 0.0]
    """
    return [tag_score(completion_text(c), think_tag, answer_tag) for c in completions]
