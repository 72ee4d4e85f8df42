"""The policy a stage trains: one object for everything that differs between a full and a LoRA policy.

Callers (the rl trainer, the SFT stage) ask the `Policy`; none of them branches on LoRA:
- load: a full policy resumes from the checkpoint's merged weights; a LoRA one loads its frozen base and
  resumes the adapter (docs/lora.md);
- trainable parameters: with LoRA only the adapters require grad (`apply_lora`), so the optimizer, built
  from the parameters that require grad, trains those;
- KL reference: a second frozen copy of the starting weights, or for LoRA the same module with its adapters
  disabled (no copy);
- weights for sync: the engine gets `gspo.models.loading.checkpoint_state_items`, merged for LoRA; a LoRA run
  resumed from a checkpoint must send them once before the first rollout (the engine loaded the base);
- save: `final/` is always a plain merged model the next stage loads; LoRA adds `final_adapter/`; a
  checkpoint holds `model/`, or for LoRA `adapter/` and/or the merged `model/` (`lora.save`);
- a sharded checkpoint (`gspo.training.dist_checkpoint`, a `dcp/` folder) holds the trained weights in its
  shards: the policy is loaded from `cfg.model` and `load_distributed_checkpoint` restores them.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from gspo.models import lora
from gspo.models.loading import load_policy
from gspo.models.provenance import provenance, write_provenance

SHARDED_DIR = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint folder (gspo.training.dist_checkpoint)


def is_sharded_checkpoint(path: str) -> bool:
    """Whether checkpoint `path` was written by `save_distributed_checkpoint` (weights in shards, not `model/`)."""
    return os.path.isdir(os.path.join(path, SHARDED_DIR))


class Policy:
    """The trained model with its tokenizer, full or LoRA (`lora.enabled`); see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, lora_cfg: Any, *, resumed: bool = False,
                 sharded_resume: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lora_cfg = lora_cfg
        self.resumed = resumed
        # Resumed from a sharded checkpoint: the weights arrive later (load_distributed_checkpoint), after the
        # engine loaded `model_path`, so the engine needs them once before the first rollout.
        self.sharded_resume = sharded_resume
        # Where the engine loads the same starting weights from (before any adapter is added).
        self.model_path = provenance(model)["loaded_from"]
        self.metrics: dict[str, float] = {}  # logged with every rollout (LoRA: trainable share, ...)

    @classmethod
    def load(cls, cfg: Any, *, output_dir: str, resume: str | None = None, engine: str | None = None) -> Policy:
        """The stage's policy from `cfg.model` / `cfg.lora`, resumed from checkpoint `resume` if given.
        `engine`: the rollout engine its weights will be synced to (checks that LoRA's sync mode works)."""
        lora_on = cfg.lora.enabled
        # A resumed full run loads the checkpoint's weights as a plain HF directory (the engine loads the same);
        # a LoRA run keeps its frozen base (cfg.model) and resumes the adapter instead.
        # A sharded checkpoint has no model/: the policy starts from cfg.model and its shards are loaded later.
        model_cfg = cfg.model
        sharded = bool(resume) and is_sharded_checkpoint(resume)
        if resume and not lora_on and not sharded:
            model_cfg = cfg.model.model_copy(update={"name_or_path": os.path.join(resume, "model"), "tiny": {}})
        model, tokenizer = load_policy(model_cfg, output_dir=output_dir)
        policy = cls(model, tokenizer, cfg.lora, resumed=bool(resume), sharded_resume=sharded)
        if lora_on:  # adapters before router controls and the optimizer, so only adapter parameters train
            if engine is not None:
                lora.check_sync_mode(cfg.lora, engine)
            policy.model = lora.apply_lora(model, cfg.lora)
            policy.metrics = policy.model.gspo_lora.metrics()
            if resume and not sharded:
                lora.load_adapter(policy.model, os.path.join(resume, lora.ADAPTER_DIR))
        return policy

    @property
    def is_lora(self) -> bool:
        return bool(self.lora_cfg.enabled)

    @property
    def engine_needs_first_sync(self) -> bool:
        """Whether the engine, which loaded `model_path`, must get the weights before the first rollout: a
        resumed LoRA run (the engine has the base, the policy has the resumed adapter), or any run resumed from
        a sharded checkpoint (the engine has `cfg.model`, the shards hold the trained weights)."""
        return self.resumed and (self.is_lora or self.sharded_resume)

    def reference(self, model_cfg: Any, output_dir: str) -> torch.nn.Module | None:
        """The frozen KL reference (the stage's starting policy, `model_cfg`), or None when the policy itself
        serves as one inside `reference_context` (LoRA with its adapters disabled: no second copy)."""
        if self.is_lora:
            return None
        ref, _ = load_policy(model_cfg, output_dir=output_dir)
        return ref.eval().requires_grad_(False)

    def reference_context(self, model: Any) -> AbstractContextManager:
        """Context in which `model` (the unwrapped policy) computes the reference's log-probs when
        `reference()` returned None."""
        return model.disable_adapter() if self.is_lora else nullcontext()


def save_final(model: Any, tokenizer: Any, directory: str) -> None:
    """Write the stage's model artifact: a plain model folder (merged for LoRA, plus `<directory>_adapter/`)."""
    if lora.is_lora(model):  # the next stage loads a plain checkpoint; the adapter is kept next to it
        lora.save_merged(model, directory, tokenizer)
        lora.save_adapter(model, directory + "_adapter", tokenizer)
    else:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        write_provenance(model, directory)


def save_checkpoint_model(model: Any, tokenizer: Any, directory: str, *, lora_save: str = "both") -> None:
    """A checkpoint's model: `model/` for a full policy; for LoRA `adapter/` (what resuming needs) and/or the
    merged `model/`, per `lora.save`."""
    if lora.is_lora(model):
        lora.save_lora(model, directory, tokenizer, save=lora_save)
    else:
        save = os.path.join(directory, "model")
        model.save_pretrained(save)
        tokenizer.save_pretrained(save)
        write_provenance(model, save)
