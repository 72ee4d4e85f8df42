"""Reading completions and prompts in either format (plain strings or conversational message lists)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

EXCERPT_CHARS = 160


def completion_text(completion: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a plain or conversational completion (the contents of its messages, concatenated).

    >>> completion_text("4")
    '4'
    >>> completion_text([{"role": "assistant", "content": "<answer>4</answer>"}])
    '<answer>4</answer>'
    """
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion)


def prompt_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The text of a plain or conversational prompt (the last user message for conversations).

    >>> prompt_text([{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}])
    '2+2?'
    """
    if isinstance(prompt, str):
        return prompt
    users = [m for m in prompt if m.get("role") == "user"]
    return str((users or list(prompt) or [{"content": ""}])[-1].get("content") or "")


def excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."
