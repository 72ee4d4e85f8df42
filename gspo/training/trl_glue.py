"""What the stages built on TRL trainers (sft, reward_model) share: chat-message rows, the training arguments
that come from the common config sections, metrics.jsonl logging, and the `final/` save.

Several processes (torchrun / accelerate launch): TRL's trainers run data parallel as they are (accelerate's
state counts the launch's processes, `use_cpu` included; each process takes `batch_size` rows, so the global
batch is N x batch_size, and transformers averages the loss over the global batch's tokens). What gspo adds is
that one process writes: metrics.jsonl, final/, and a `tiny:` model built into output_dir."""

from __future__ import annotations

import os
from typing import Any

from gspo.training.metrics_log import MetricsWriter
from gspo.training.optim import scheduler_name


def as_messages(x: Any, role: str) -> list[dict[str, str]]:
    """A chat-message list as is; a plain string as one message of `role`."""
    return x if isinstance(x, list) else [{"role": role, "content": str(x)}]


def common_args(cfg: Any, stage: Any) -> dict[str, Any]:
    """transformers TrainingArguments from the `optim`, `logging`, `model` sections, the seed, and the length
    keys every TRL stage's own section has (`stage`: num_epochs, max_steps, batch_size, max_length)."""
    import torch

    o = cfg.optim
    return {
        "output_dir": os.path.join(cfg.output_dir, "trl"), "num_train_epochs": stage.num_epochs,
        "max_steps": stage.max_steps, "per_device_train_batch_size": stage.batch_size,
        "max_length": stage.max_length, "learning_rate": o.lr, "weight_decay": o.weight_decay,
        "adam_beta1": o.adam_beta1, "adam_beta2": o.adam_beta2, "adam_epsilon": o.adam_eps,
        "max_grad_norm": o.max_grad_norm, "lr_scheduler_type": scheduler_name(o), "warmup_steps": o.warmup_steps,
        "logging_steps": max(1, cfg.logging.log_every), "save_strategy": "no",
        "report_to": list(cfg.logging.trackers) or "none", "seed": cfg.seed, "data_seed": cfg.seed,
        "use_cpu": not torch.cuda.is_available(), "bf16": cfg.model.dtype == "bfloat16",
        "disable_tqdm": not cfg.logging.progress, "dataset_num_proc": None,
    }


def launch_state(args: Any) -> Any:
    """accelerate's state of this launch, as the TRL trainer built with `args` will use it (`is_main_process`,
    `main_process_first()`, `wait_for_everyone()`). Reading `args.device` sets it up, and with it the process
    group of a multi-process launch."""
    _ = args.device
    return args.distributed_state


def metrics_callback(writer: MetricsWriter | None) -> Any:
    """A TrainerCallback writing each logged step (with a loss) to metrics.jsonl; None (the processes other than
    the main one): nothing written."""
    from transformers import TrainerCallback

    class _ToJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # transformers' signature
            if writer is not None and logs and "loss" in logs:
                writer.write({"step": state.global_step, "rollout": 0, **{k: v for k, v in logs.items()
                                                                            if isinstance(v, (int, float))}})

    return _ToJsonl()


def train_and_save(trainer: Any, tokenizer: Any, output_dir: str) -> str:
    """Train, then write the model and tokenizer to `output_dir/final` (the stage's artifact; with LoRA the
    merged model there and the adapter in `final_adapter/`, as the rl stage does)."""
    from gspo.models.policy import save_final

    trainer.train()
    final = os.path.join(output_dir, "final")
    acc = trainer.accelerator
    # Several processes: the main one writes a replicated (DDP) model; a sharded one (accelerate's FSDP
    # plugin) is gathered by every process in save_pretrained, so each takes part.
    if acc.is_main_process or _is_sharded(trainer.model):
        save_final(trainer.model, tokenizer, final)
    acc.wait_for_everyone()  # no process returns (a pipeline's next stage) before final/ is written
    return final


def _is_sharded(model: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
