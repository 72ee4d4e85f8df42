"""The `reward_model` stage: a sequence-classification reward model trained on preference pairs (TRL RewardTrainer).

Pairs, model, training and the held-out check: docs/stages.md. The pairs become conversations, so the model
sees prompt + answer through its chat template exactly as the `reward_model` reward (rewards/reward_model.py)
formats them when it scores completions later. Loss: Bradley-Terry, -log sigmoid(r(chosen) - r(rejected))
(TRL; InstructGPT Eq. 1). Writes `OUTPUT_DIR/final` (model + tokenizer) and returns it: the `reward_model`
reward's `model_path`.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from gspo.data import hf_dataset_options, load_rows
from gspo.registry import STAGES, TASKS, StageSpec
from gspo.training.metrics_log import MetricsWriter
from gspo.training.summary import length_line
from gspo.training.trl_glue import as_messages, common_args, launch_state, metrics_callback, train_and_save


def preference_rows(data_cfg: Any, *, seed: int) -> list[dict[str, Any]]:
    """Conversational {prompt, chosen, rejected} pairs from a task's preference_rows() or a dataset."""
    if data_cfg.task:
        task = TASKS.get(data_cfg.task)(**dict(data_cfg.task_kwargs or {}))
        if not hasattr(task, "preference_rows"):
            able = [n for n, t in TASKS.items() if hasattr(t, "preference_rows")]
            raise ValueError(f"data.task={data_cfg.task!r} has no preference pairs (preference_rows); tasks that "
                             f"do: {', '.join(able) or 'none'}; or give data.path with prompt/chosen/rejected")
        raw = task.preference_rows(data_cfg.num_samples, seed=seed)
    else:
        raw = load_rows(data_cfg.path, data_cfg.split, **hf_dataset_options(data_cfg))
    col, out = data_cfg.prompt_column, []
    for i, row in enumerate(raw):
        missing = [c for c in (col, "chosen", "rejected") if c not in row]
        if missing:
            raise ValueError(f"reward_model data row {i}: missing {', '.join(missing)} (needs {col!r} "
                             f"(data.prompt_column), 'chosen', 'rejected'); columns: {', '.join(sorted(row))}")
        out.append({"prompt": as_messages(row[col], "user"), "chosen": as_messages(row["chosen"], "assistant"),
                    "rejected": as_messages(row["rejected"], "assistant")})
    return out


def build_reward_model(model_cfg: Any, *, seed: int) -> tuple[Any, Any]:
    """(AutoModelForSequenceClassification with one output, tokenizer) per the docstring's model rules."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from gspo.models.loading import TINY_PREFIX, build_tokenizer, tiny_config, torch_dtype_of

    dtype = torch_dtype_of(model_cfg.dtype)
    if model_cfg.name_or_path.startswith(TINY_PREFIX):
        tokenizer = build_tokenizer()
        overrides = dict(model_cfg.tiny or {})
        init_seed = int(overrides.pop("seed", seed))
        config = tiny_config(model_cfg.name_or_path[len(TINY_PREFIX):] or "qwen3_moe", tokenizer, **overrides)
        config.num_labels = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or model_cfg.name_or_path,
                                                  trust_remote_code=model_cfg.trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_cfg.name_or_path, num_labels=1, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The head pools the last non-pad token, found through config.pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def pairwise_accuracy(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], *, batch_size: int = 16) -> float:
    """Share of pairs whose chosen side scores above the rejected side, scored as the reward function does."""
    from gspo_rewards.reward_model import format_pair, score_texts

    was_training = model.training
    model.eval()
    try:
        chosen = score_texts(model, tokenizer, [format_pair(tokenizer, p["prompt"], p["chosen"]) for p in pairs],
                             batch_size=batch_size)
        rejected = score_texts(model, tokenizer, [format_pair(tokenizer, p["prompt"], p["rejected"])
                                                  for p in pairs], batch_size=batch_size)
    finally:
        model.train(was_training)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def run_reward_model(cfg: Any) -> str:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    out, rc = cfg.output_dir, cfg.reward_model
    os.makedirs(out, exist_ok=True)
    pairs = preference_rows(cfg.data, seed=cfg.seed)
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = max(1, round(rc.eval_fraction * len(pairs)))
    if len(pairs) - n_eval < 1:
        raise ValueError(f"reward_model: {len(pairs)} pairs leave none to train on after holding out "
                         f"reward_model.eval_fraction={rc.eval_fraction}; give more pairs (data.num_samples)")
    eval_pairs, train_pairs = pairs[:n_eval], pairs[n_eval:]
    model, tokenizer = build_reward_model(cfg.model, seed=cfg.seed)
    args = RewardConfig(
        **common_args(cfg, rc),
        per_device_eval_batch_size=rc.batch_size,
        center_rewards_coefficient=rc.center_rewards_coefficient,
        gradient_checkpointing=cfg.model.gradient_checkpointing,  # TRL's default would be True
        eval_strategy="no",
    )
    main = launch_state(args).is_main_process  # several processes: data parallel, the main one writes
    writer = MetricsWriter(out) if main else None
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_pairs),
                            processing_class=tokenizer, callbacks=[metrics_callback(writer)])
    final = train_and_save(trainer, tokenizer, out)

    metrics = {"eval/accuracy": pairwise_accuracy(trainer.model, tokenizer, eval_pairs),
               "train/accuracy": pairwise_accuracy(trainer.model, tokenizer, train_pairs[:len(eval_pairs)]),
               "eval/num_pairs": len(eval_pairs), "train/num_pairs": len(train_pairs)}
    if main:
        writer.write({"step": trainer.state.global_step, "rollout": 0, **metrics})
        with open(os.path.join(out, "eval.json"), "w", encoding="utf-8") as f:
            json.dump({"model": final, **metrics}, f, indent=1)
    return final


STAGES.register("reward_model", StageSpec(
    name="reward_model", runner=run_reward_model,
    help="train a sequence-classification reward model on preference pairs with TRL's RewardTrainer",
    sections=("reward_model", "optim"), produces="reward_model", output="final",
    data_rows=lambda cfg: None,  # preference pairs: the stage's own loader names its problems
    summary=lambda cfg: [length_line(cfg, cfg.reward_model)]))
