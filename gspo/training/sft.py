"""The `sft` stage (cold start, general SFT) on TRL's SFTTrainer.

Data: a registered synthetic task (its reference completions) or a JSONL / HF dataset with either
`prompt` + `completion` columns or a `messages` column. Loss on the completion tokens only by default.
Writes `OUTPUT_DIR/final` (model + tokenizer) and `OUTPUT_DIR/metrics.jsonl` (one row per logged step).
"""

from __future__ import annotations

import os
from typing import Any

from gspo.data import load_rows
from gspo.logging import MetricsWriter
from gspo.registry import STAGES, TASKS
from gspo.training.model import load_policy
from gspo.training.optim import scheduler_name


def _as_messages(x: Any, role: str) -> list[dict[str, str]]:
    return x if isinstance(x, list) else [{"role": role, "content": str(x)}]


def sft_rows(data_cfg: Any, *, seed: int) -> list[dict[str, Any]]:
    """Conversational prompt/completion rows (TRL's prompt-completion format) or `messages` rows."""
    if data_cfg.task:
        task = TASKS.get(data_cfg.task)(**dict(data_cfg.task_kwargs or {}))
        raw = task.sft_rows(data_cfg.num_samples, seed=seed)
    else:
        raw = load_rows(data_cfg.path, data_cfg.split)
    out = []
    for i, row in enumerate(raw):
        if "messages" in row:
            out.append({"messages": row["messages"]})
        elif data_cfg.prompt_column in row and "completion" in row:
            out.append({"prompt": _as_messages(row[data_cfg.prompt_column], "user"),
                        "completion": _as_messages(row["completion"], "assistant")})
        else:
            raise ValueError(f"sft data row {i}: needs `messages`, or `{data_cfg.prompt_column}` (data.prompt_column) "
                             f"and `completion`; columns: {', '.join(sorted(row))}")
    return out


def _metrics_callback(writer: MetricsWriter) -> Any:
    from transformers import TrainerCallback

    class _ToJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                writer.write({"step": state.global_step, "rollout": 0, **{k: v for k, v in logs.items()
                                                                            if isinstance(v, (int, float))}})

    return _ToJsonl()


@STAGES.register("sft")
def run_sft(cfg: Any) -> str:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = cfg.output_dir
    model, tokenizer = load_policy(cfg.model, output_dir=out)
    s, o = cfg.sft, cfg.optim
    args = SFTConfig(
        output_dir=os.path.join(out, "trl"),
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_epsilon=o.adam_eps,
        max_grad_norm=o.max_grad_norm,
        lr_scheduler_type=scheduler_name(o),
        warmup_steps=o.warmup_steps,
        num_train_epochs=s.num_epochs,
        max_steps=s.max_steps,
        per_device_train_batch_size=s.batch_size,
        max_length=s.max_length,
        packing=s.packing,
        completion_only_loss=s.completion_only_loss,
        logging_steps=max(1, cfg.logging.log_every),
        save_strategy="no",
        report_to=list(cfg.logging.trackers) or "none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        bf16=cfg.model.dtype == "bfloat16",
        disable_tqdm=not cfg.logging.progress,
        router_aux_loss_coef=cfg.moe.aux_loss_coef or None,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_rows(cfg.data, seed=cfg.seed)),
                         processing_class=tokenizer, callbacks=[_metrics_callback(MetricsWriter(out))])
    trainer.train()
    final = os.path.join(out, "final")
    trainer.model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    return final
