"""Prompt datasets: registered synthetic tasks, JSONL files and Hugging Face datasets; a resumable sampler.

A dataset is a list of rows (dicts). Every row has a `prompt` (a string, or a list of chat messages) and any
number of other columns; every column reaches the reward functions as a keyword argument (TRL's contract).
Synthetic tasks also provide `sft_rows()`: prompt + a reference completion, for cold-start SFT.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

from gspo.registry import TASKS


@dataclass
class PromptDataset:
    """A stage's prompts: one dict per row with a `prompt` and the dataset's other columns (passed to rewards)."""

    rows: list[dict[str, Any]]

    @property
    def columns(self) -> list[str]:
        return sorted(self.rows[0]) if self.rows else []

    def __len__(self) -> int:
        return len(self.rows)


class PromptSampler:
    """Draws batches of B prompts, epoch by epoch, each epoch shuffled by its own seed.

    The state (epoch, position) is all a resumed run needs to continue with the exact same prompts.
    """

    def __init__(self, num_rows: int, batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if num_rows < batch_size:
            raise ValueError(f"dataset has {num_rows} rows, fewer than rollout.prompts_per_step={batch_size}")
        self.num_rows, self.batch_size, self.seed, self.shuffle = num_rows, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._cached: tuple[int, list[int]] | None = None  # (epoch, its order): shuffled once per epoch

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            order = list(range(self.num_rows))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._cached = (epoch, order)
        return self._cached[1]

    def next_indices(self) -> list[int]:
        # Batches never straddle epochs: the tail of an epoch that cannot fill a batch is dropped,
        # so every batch has exactly B distinct prompts.
        if self.position + self.batch_size > self.num_rows:
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order(self.epoch)
        idx = order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return idx

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def _load_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TypeError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def load_rows(path: str, split: str = "train", *, name: str | None = None,
              revision: str | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file (`.jsonl`/`.json` lines) or of a Hugging Face dataset (local dir or hub id; `name`
    is the dataset's configuration, e.g. `main` of gsm8k, `revision` a branch, tag or commit)."""
    if path.endswith((".jsonl", ".json")) and os.path.isfile(path):
        return _load_jsonl(path)
    import datasets  # heavy; only when a dataset is really used

    def hub() -> Any:
        return datasets.load_dataset(path, name=name, split=split, revision=revision)

    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError:
            ds = hub()
    else:
        ds = hub()
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"data.split={split!r} not in {path}; splits: {', '.join(ds)}")
        ds = ds[split]
    return [dict(r) for r in ds]


# --- prompt rendering ------------------------------------------------------------------------------------

CHAT_TEMPLATE_MODES = ("auto", "always", "never")


def uses_chat_template(prompt: Any, mode: str) -> bool:
    """Whether `prompt` goes through the tokenizer's chat template under data.chat_template=`mode`.

    `auto` follows TRL's dataset formats: conversational prompts (a list of messages) get the template, plain
    strings ("standard" format) are used as they are. `always` wraps a string as one user turn.
    """
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"data.chat_template={mode!r}: choose one of {', '.join(CHAT_TEMPLATE_MODES)}")
    if mode == "auto":
        return isinstance(prompt, list)
    return mode == "always"


def render_prompt(tokenizer: Any, prompt: Any, mode: str = "auto") -> str:
    """The text the model is prompted with (see `uses_chat_template`)."""
    if not uses_chat_template(prompt, mode):
        if not isinstance(prompt, str):
            raise ValueError(f"data.chat_template={mode}: a conversational prompt (list of messages) needs the "
                             "chat template; use data.chat_template=auto or always")
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"data.chat_template={mode}: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has "
                         "no chat template; use plain-text prompts with data.chat_template=never")
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_token_ids(tokenizer: Any, prompt: Any, mode: str = "auto") -> list[int]:
    """Token ids of the rendered prompt. No special tokens are added (TRL's GRPO does the same): a chat
    template writes its own, and a plain prompt is the user's text exactly."""
    return tokenizer(render_prompt(tokenizer, prompt, mode), add_special_tokens=False)["input_ids"]


def describe_prompt_format(rows: list[dict[str, Any]], mode: str, tokenizer: Any) -> str:
    """One log line: the resolved chat-template choice and the first prompt as the model sees it."""
    templated = sum(uses_chat_template(r["prompt"], mode) for r in rows)
    if templated == len(rows):
        choice = "chat template on every prompt"
    elif templated == 0:
        choice = "no chat template (plain-text prompts used as they are)"
    else:
        choice = f"chat template on {templated} of {len(rows)} prompts (the conversational ones)"
    first = render_prompt(tokenizer, rows[0]["prompt"], mode) if rows else ""
    return f"data.chat_template={mode}: {choice}; first prompt as rendered: {first!r}"


def hf_dataset_options(data_cfg: Any) -> dict[str, Any]:
    """data.name / data.revision as `load_rows` keywords."""
    return {"name": getattr(data_cfg, "name", None), "revision": getattr(data_cfg, "revision", None)}


def build_dataset(data_cfg: Any, *, seed: int) -> PromptDataset:
    """Rows for `data_cfg` (fields task, path, split, prompt_column, num_samples, task_kwargs)."""
    if data_cfg.task:
        task = TASKS.get(data_cfg.task)(**dict(data_cfg.task_kwargs or {}))
        rows = task.rows(data_cfg.num_samples, seed=seed)
    else:
        rows = load_rows(data_cfg.path, data_cfg.split, **hf_dataset_options(data_cfg))
    if not rows:
        raise ValueError(f"data: no rows in {data_cfg.task or data_cfg.path}")
    col = data_cfg.prompt_column
    for i, row in enumerate(rows):
        if col not in row:
            raise ValueError(f"data row {i}: no column {col!r} (data.prompt_column); columns: {', '.join(sorted(row))}")
        if col != "prompt":
            row["prompt"] = row.pop(col)
        if getattr(data_cfg, "chat_template", "auto") == "never" and isinstance(row["prompt"], list):
            raise ValueError(f"data row {i}: the prompt is a list of chat messages but data.chat_template=never "
                             "(plain text only); use data.chat_template=auto")
    return PromptDataset(rows)


# --- synthetic tasks -------------------------------------------------------------------------------------


@TASKS.register("add")
class AddTask:
    """Integer addition with a checkable answer: "What is 23+58?" -> "<answer>81</answer>".

    `digits` sets the operand size. The reference completion shows the sum in the answer tags, which is
    what the `synthetic_accuracy` and `synthetic_format` rewards check. Small enough that a tiny MoE learns it
    on a CPU in minutes once a brief SFT warm start has taught it the format.
    """

    def __init__(self, digits: int = 1, think: bool = False) -> None:
        if digits < 1:
            raise ValueError("data.task_kwargs.digits must be >= 1")
        self.digits, self.think = digits, think

    def _operands(self, rng: random.Random) -> tuple[int, int]:
        hi = 10**self.digits - 1
        return rng.randint(0, hi), rng.randint(0, hi)

    def rows(self, num_samples: int, *, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        out = []
        for _ in range(num_samples):
            a, b = self._operands(rng)
            out.append({"prompt": f"What is {a}+{b}?", "answer": str(a + b)})
        return out

    def completion(self, row: dict[str, Any]) -> str:
        a, b = row["prompt"][len("What is ") : -1].split("+")
        think = f"<think>{a}+{b}={row['answer']}</think>" if self.think else ""
        return f"{think}<answer>{row['answer']}</answer>"

    def sft_rows(self, num_samples: int, *, seed: int) -> list[dict[str, Any]]:
        """Prompt + reference completion pairs (for cold-start SFT)."""
        return [dict(r, completion=self.completion(r)) for r in self.rows(num_samples, seed=seed)]


@TASKS.register("add_concise")
class ConciseAddTask(AddTask):
    """The addition task with a style preference, for the alignment stages: concise answers are preferred.

    `rows()` are AddTask's prompts; `preference_rows()` gives chosen/rejected pairs for the `reward_model`
    stage, two kinds, half each:
    - style: chosen `<answer>c</answer>`, rejected the same answer after a `<think>...</think>` block (the cold
      start's style with `think: true`);
    - well-formed over broken: chosen a well-formed answer (either style), rejected a malformed one (tags
      missing, unclosed or repeated, no answer, stray characters). Without these, a reward model trained on
      style pairs alone scores any short junk highest and the policy collapses to it (measured: "v7</answer>").
    Answers are right in half the pairs and wrong in the other half, the same on both sides of a pair: the
    preference is about style and form only, so an alignment stage must keep accuracy through its accuracy
    reward.
    """

    def __init__(self, digits: int = 1, think: bool = False, think_rate: float | None = None) -> None:
        super().__init__(digits=digits, think=think)
        if think_rate is not None and not 0.0 <= think_rate <= 1.0:
            raise ValueError(f"data.task_kwargs.think_rate must be in [0, 1], got {think_rate}")
        self.think_rate = think_rate

    def sft_rows(self, num_samples: int, *, seed: int) -> list[dict[str, Any]]:
        """Reference completions; with `think_rate`, that share of them (drawn per row) has a think block.

        A cold start on such a mix leaves both styles likely for every prompt, so an alignment stage can find
        and reinforce the concise one (a policy that always thinks never samples a concise answer to reward).
        """
        if self.think_rate is None:
            return super().sft_rows(num_samples, seed=seed)
        rng = random.Random(seed + 104_729)
        styles = {True: AddTask(self.digits, think=True), False: AddTask(self.digits, think=False)}
        return [dict(r, completion=styles[rng.random() < self.think_rate].completion(r))
                for r in self.rows(num_samples, seed=seed)]

    def preference_rows(self, num_samples: int, *, seed: int) -> list[dict[str, Any]]:
        rng = random.Random(seed + 7_919)  # pairs differ from the RL prompts drawn with the same seed
        hi = 2 * (10**self.digits - 1)
        out = []
        for row in self.rows(num_samples, seed=seed):
            a, b = row["prompt"][len("What is ") : -1].split("+")
            shown = row["answer"] if rng.random() < 0.5 else str(rng.randint(0, hi))
            # The reasoning in a think block is right or off by a little, as a sampled one would be.
            think = f"<think>{a}+{b}={int(row['answer']) + rng.choice([0, 0, 0, -1, 1])}</think>"
            concise = f"<answer>{shown}</answer>"
            if rng.random() < 0.5:
                chosen, rejected = concise, think + concise
            else:
                chosen = concise if rng.random() < 0.5 else think + concise
                rejected = self._broken(rng, think, shown)
            out.append({"prompt": row["prompt"], "answer": row["answer"], "chosen": chosen, "rejected": rejected})
        return out

    @staticmethod
    def _broken(rng: random.Random, think: str, shown: str) -> str:
        noise = "".join(rng.choice("0123456789+=<>/abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 4)))
        return rng.choice([
            shown,                                         # no tags
            f"<answer>{shown}",                            # unclosed
            f"{noise}{shown}</answer>",                    # stray characters, no opening tag
            f"<answer>{shown}</answer></answer>",          # repeated closing tag
            f"<answer>{shown}</answer>{noise}",            # trailing text
            think,                                         # reasoning but no answer
            think.replace("</think>", "</answer>"),        # mismatched tags
            noise,                                         # nothing of the answer
        ])
