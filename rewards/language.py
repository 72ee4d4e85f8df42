"""Language consistency (DeepSeek-R1 stage 2): the share of the text written in the target script.

DeepSeek-R1 rewards "the proportion of target language words in the CoT" to stop language mixing. We
classify by Unicode script (latin, cjk, cyrillic, greek, arabic, hebrew, devanagari, thai, hangul), which
needs no language-id model: a word's script is the majority script of its letters; each CJK character
counts as one word.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from gspo.rewards import completion_text, register_reward

SCRIPTS = ("latin", "cjk", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "thai", "hangul")
_PREFIX = {"CJK": "cjk", "HIRAGANA": "cjk", "KATAKANA": "cjk", "IDEOGRAPHIC": "cjk", "HANGUL": "hangul"}
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W\d_]+", re.UNICODE)


def char_script(ch: str) -> str | None:
    """Script of one letter ("latin", "cjk", ...), None for digits, punctuation and unknown scripts.

    >>> char_script("a"), char_script("数"), char_script("ж"), char_script("7")
    ('latin', 'cjk', 'cyrillic', None)
    """
    if not ch.isalpha():
        return None
    first = unicodedata.name(ch, "").split(" ")[0]
    script = _PREFIX.get(first, first.lower())
    return script if script in SCRIPTS else None


def script_fraction(text: str, target: str, unit: str = "word") -> float | None:
    """Share of words (or letters, unit="char") in `target` script; None when the text has none.

    >>> script_fraction("the answer 是 4", "latin"), script_fraction("42 !", "latin")
    (0.6666666666666666, None)
    """
    if unit == "char":
        scripts = [s for s in map(char_script, text) if s]
    elif unit == "word":
        scripts = []
        for word in _TOKEN.findall(text):
            counts = Counter(s for s in map(char_script, word) if s)
            if counts:
                scripts.append(counts.most_common(1)[0][0])
    else:
        raise ValueError(f"language_consistency: unit={unit!r}; valid: char, word")
    return sum(s == target for s in scripts) / len(scripts) if scripts else None


@register_reward("language_consistency")
def language_consistency(prompts, completions, completion_ids=None, *, target: str = "latin", unit: str = "word",
                         tag: str | None = None, **_):
    """Share of the completion (or of its `<tag>...</tag>` span, e.g. tag="think") in the `target` script;
    None (abstain) when there is no letter to judge.

    >>> language_consistency(["p"] * 3, ["all english here", "mixed 中文 here", "用中文 ok"], target="latin")
    [1.0, 0.5, 0.25]
    >>> language_consistency(["p"], ["<think>用中文</think> ok"], target="cjk", tag="think")
    [1.0]
    """
    if target not in SCRIPTS:
        raise ValueError(f"language_consistency: target={target!r}; valid: {', '.join(SCRIPTS)}")
    out = []
    for c in completions:
        text = completion_text(c)
        if tag is not None:
            spans = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, re.DOTALL)
            text = spans[-1] if spans else ""
        out.append(script_fraction(text, target, unit))
    return out
