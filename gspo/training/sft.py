"""The `sft` stage (cold start, general SFT) on TRL's SFTTrainer.

Data: a registered synthetic task (its reference completions) or a JSONL / HF dataset with either
`prompt` + `completion` columns or a `messages` column. Loss on the completion tokens only by default.
Writes `OUTPUT_DIR/final` (model + tokenizer) and `OUTPUT_DIR/metrics.jsonl` (one row per logged step).
With `lora.enabled` only the adapters train; `final/` is the merged model and `final_adapter/` the adapter.
"""

from __future__ import annotations

from typing import Any

from gspo.data import hf_dataset_options, load_rows
from gspo.models.policy import Policy
from gspo.registry import STAGES, TASKS, StageSpec
from gspo.training.metrics_log import MetricsWriter
from gspo.training.summary import length_line
from gspo.training.trl_glue import as_messages, common_args, launch_state, metrics_callback, train_and_save


def sft_rows(data_cfg: Any, *, seed: int) -> list[dict[str, Any]]:
    """Conversational prompt/completion rows (TRL's prompt-completion format) or `messages` rows."""
    if data_cfg.task:
        task = TASKS.get(data_cfg.task)(**dict(data_cfg.task_kwargs or {}))
        raw = task.sft_rows(data_cfg.num_samples, seed=seed)
    else:
        raw = load_rows(data_cfg.path, data_cfg.split, **hf_dataset_options(data_cfg))
    out = []
    for i, row in enumerate(raw):
        if "messages" in row:
            out.append({"messages": row["messages"]})
        elif data_cfg.prompt_column in row and "completion" in row:
            out.append({"prompt": as_messages(row[data_cfg.prompt_column], "user"),
                        "completion": as_messages(row["completion"], "assistant")})
        else:
            raise ValueError(f"sft data row {i}: needs `messages`, or `{data_cfg.prompt_column}` (data.prompt_column) "
                             f"and `completion`; columns: {', '.join(sorted(row))}")
    return out


def run_sft(cfg: Any) -> str:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = cfg.output_dir
    s = cfg.sft
    args = SFTConfig(
        **common_args(cfg, s),
        packing=s.packing,
        completion_only_loss=s.completion_only_loss,
        # 0.0 switches TRL's aux loss off; None would mean "the architecture's own coefficient".
        router_aux_loss_coef=cfg.moe.aux_loss_coef,
    )
    state = launch_state(args)  # several processes: data parallel (gspo/training/trl_glue.py)
    with state.main_process_first():  # a `tiny:` model is built into output_dir once, by the main process
        policy = Policy.load(cfg, output_dir=out)  # LoRA: adapters only; final/ is still merged (train_and_save)
    model, tokenizer = policy.model, policy.tokenizer
    writer = MetricsWriter(out) if state.is_main_process else None
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_rows(cfg.data, seed=cfg.seed)),
                         processing_class=tokenizer, callbacks=[metrics_callback(writer)])
    return train_and_save(trainer, tokenizer, out)


STAGES.register("sft", StageSpec(
    name="sft", runner=run_sft,
    help="supervised fine-tuning on TRL's SFTTrainer (cold start, general SFT, SFT on rejection-sampled data)",
    sections=("sft", "optim", "lora"), consumes=("policy", "data"), produces="policy", output="final",
    data_rows=lambda cfg: sft_rows(cfg.data, seed=cfg.seed),
    summary=lambda cfg: [length_line(cfg, cfg.sft)]))
