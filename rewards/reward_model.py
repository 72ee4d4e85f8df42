"""Reward model: a sequence-classification checkpoint (local HF directory) scoring prompt + completion.

The model re-tokenizes the text with its own tokenizer (the policy's token ids mean nothing to it), through
its chat template when it has one. Loaded once per (path, device, dtype) and cached; scored in batches under
no_grad, on the trainer's device or another one (`device="cuda:1"`).
"""

from __future__ import annotations

import functools
from typing import Any

from gspo.rewards import completion_text, register_reward


@functools.lru_cache(maxsize=4)
def load_reward_model(model_path: str, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer) from a local checkpoint directory, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, dtype=getattr(torch, dtype) if dtype else torch.float32
    ).to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Sequence-classification heads read the last non-pad token; they find it through config.pad_token_id.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def format_pair(tokenizer: Any, prompt: Any, completion: Any) -> str:
    """Prompt + completion as one text: the model's chat template when it has one, else concatenated."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        messages = messages + [{"role": "assistant", "content": completion_text(completion)}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_str = prompt if isinstance(prompt, str) else "".join(m.get("content", "") for m in prompt)
    return prompt_str + completion_text(completion)


def score_texts(model: Any, tokenizer: Any, texts: list[str], *, batch_size: int = 8, max_length: int = 2048,
                label: int = 0) -> list[float]:
    """Scores (logit `label`) of texts, in batches; padding never changes a score (attention mask + the
    head's last-non-pad pooling)."""
    import torch

    scores: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length, add_special_tokens=False)
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in batch.items() if k != "token_type_ids"}).logits
        scores.extend(logits[:, label].float().cpu().tolist())
    return scores


@register_reward("reward_model")
def reward_model(prompts, completions, completion_ids=None, *, model_path: str, device: str = "cpu",
                 dtype: str | None = None, batch_size: int = 8, max_length: int = 2048, label: int = 0, **_):
    """Score each (prompt, completion) with a local sequence-classification model (kwargs: model_path, device,
    dtype, batch_size, max_length, label = which logit is the reward).

    >>> reward_model(["p"], ["c"], model_path="/nonexistent")  # doctest: +ELLIPSIS, +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    OSError: ...
    """
    model, tokenizer = load_reward_model(str(model_path), device, dtype)
    texts = [format_pair(tokenizer, p, c) for p, c in zip(prompts, completions)]
    return score_texts(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, label=label)
