"""The rl trainer's steps that exist only on several processes (FSDP2, one slice of whole prompts per rank):
gathering every rank's slice into the global batch, one optimizer step weighted by `shard_weight`, and the
sharded checkpoints. `GSPOTrainer` inherits them; on one process none of them runs (docs/architecture.md,
"Several processes")."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from gspo.devices import to_device
from gspo.rollout.base import RolloutBatch, assemble_batch
from gspo.training.dist_checkpoint import save_consolidated, save_distributed_checkpoint, save_sharded_adapter
from gspo.training.distributed import all_gather_objects, all_reduce, gather_rows
from gspo.training.finite import check_gradient_norm, clip_gradients, gradient_norm
from gspo.training.fsdp import init_root, shard_policy

logger = logging.getLogger("gspo.trainer")

if TYPE_CHECKING:
    from gspo.training.rollout_data import RolloutData


def global_reward_metrics(parts: list[dict[str, Any]]) -> dict[str, float]:
    """rewards/<name>/* over the global batch from every rank's RewardSet result: mean, std and abstain rate
    recomputed on the gathered values (as gspo/rewards/running.py computes them), errors summed; what a function
    logged itself (`log_metric`) is the mean of the ranks' values."""
    out: dict[str, float] = {}
    for key in parts[0]["metrics"]:
        vals = [p["metrics"][key] for p in parts if key in p["metrics"]]
        out[key] = sum(vals) if key.endswith("/errors") else sum(vals) / len(vals)
    for name in parts[0]["per_function"]:
        t = torch.cat([p["per_function"][name] for p in parts])
        present = t[~torch.isnan(t)]
        out[f"rewards/{name}/mean"] = present.mean().item() if present.numel() else float("nan")
        out[f"rewards/{name}/std"] = present.std(unbiased=False).item() if present.numel() else float("nan")
        out[f"rewards/{name}/abstain_rate"] = (1.0 - present.numel() / t.numel()) if t.numel() else 0.0
    return out


class ShardedSteps:
    """Methods of `GSPOTrainer` (they read its dist, model, optimizer, engine, spec, ...) for a sharded run."""

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from gspo.models.loading import torch_dtype_of

        t = self.cfg.train
        offload = t.fsdp_cpu_offload and self.device.type == "cuda"
        if t.fsdp_cpu_offload and not offload:  # FSDP2's offload needs an accelerator to gather onto
            logger.info("train.fsdp_cpu_offload: the shards already live in CPU memory on a CPU run; ignored")
        shard_policy(model, cpu_offload=offload, param_dtype=torch_dtype_of(
            t.fsdp_param_dtype, "train.fsdp_param_dtype") if t.fsdp_param_dtype else None)
        init_root(model)  # the logprob passes call the decoder directly (gspo/training/fsdp.py)
        return model

    def _global_rows(self, local: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
        """This rank's rows of a per-completion tensor ([n_mine, ...]) -> the global batch's ([N, ...])."""
        if not self.dist.sharded:
            return local
        return gather_rows(local, self._mine, batch.num_completions, self.dist)

    def _gather_records(self, records: Any) -> Any:
        """π_old's routing of this rank's rows -> the global batch's (moe/* over the global batch, replay)."""
        if not self.dist.sharded:
            return records
        n = self._total

        def full(ts: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if ts is None else [gather_rows(t, self._mine, n, self.dist) for t in ts]

        return replace(records, indices=full(records.indices), router_indices=full(records.router_indices),
                       entropy=full(records.entropy), mask=gather_rows(records.mask, self._mine, n, self.dist),
                       logits=None)

    def _gather_rollout(self, prompt_ids: list[list[int]], local: RolloutBatch,
                        result: Any) -> tuple[RolloutBatch, torch.Tensor, dict[str, float]]:
        """Every rank's completions and rewards, in prompt order: the batch a one-process run would have
        sampled (ranks hold contiguous slices), the global rewards and reward metrics."""
        parts = all_gather_objects({
            "ids": [ids[m.bool()].tolist() for ids, m in zip(local.completion_ids, local.mask)],
            "logp": None if local.logp is None else [lp[m.bool()].tolist() for lp, m in zip(local.logp, local.mask)],
            "reasons": local.finish_reasons, "texts": local.completions, "rewards": result.rewards,
            "per_function": result.per_function, "metrics": result.metrics}, self.dist)
        cat = lambda key: [x for p in parts for x in p[key]]
        logps = None if parts[0]["logp"] is None else cat("logp")
        batch = assemble_batch(prompt_ids, cat("ids"), logps, cat("reasons"), cat("texts"),
                               group_size=local.group_size, pad_token_id=self.engine.pad_token_id)
        rewards = torch.cat([p["rewards"] for p in parts])
        return batch, rewards, global_reward_metrics(parts)

    def _sharded_minibatch(self, data: RolloutData, idx: torch.Tensor, epoch: int, j: int,
                           opts: dict[str, Any]) -> dict[str, Any]:
        """One optimizer step of several processes on minibatch `idx` (rows of the global batch, the one-process
        run's seeded partition): each rank's loss on its own rows of it, weighted by `shard_weight` so that the
        averaged (reduce-scattered) gradient is the one-process gradient of the whole minibatch (LossSpec
        normalizer: completions, tokens or rows). A rank with no row of it still runs forward and backward
        (FSDP's collectives need every rank) on one row with weight 0. Loss and clip fractions are the loss
        function's on the gathered global minibatch; the grad norm is FSDP's global norm."""
        from gspo.algorithms import shard_weight

        d, lo, hi = self.dist, self._mine[0], self._mine[-1] + 1
        pos = [p for p, r in enumerate(idx.tolist()) if lo <= r < hi]  # this rank's rows, in minibatch order
        rows = idx[pos] if pos else idx[:1]  # idx[:1]: a stand-in row, weighted 0
        mask_all = data.batch.mask[idx]
        w = shard_weight(self.spec.batch_count(data.batch.mask[idx[pos]]) if pos else 0.0,
                         self.spec.batch_count(mask_all), d.world)
        tokens = float(data.batch.mask[idx[pos]].sum()) if pos else 0.0
        w_tok = shard_weight(tokens, float(mask_all.sum()), d.world)  # MoE auxiliary losses: token means
        self.optimizer.zero_grad(set_to_none=True)
        with self.moe.update_pass(rows, data.layout_mask(rows)) as moe_mb:
            logp = self._logp(data.batch, rows, prompt_len=data.prompt_len)
            dev = logp.device
            ref_logp = to_device(data.ref_logp[rows], dev) if data.ref_logp is not None else None
            loss_out = self.spec.fn(logp, to_device(data.old_logp[rows], dev), to_device(data.adv[rows], dev),
                                    to_device(data.batch.mask[rows], dev), clip_low=self.clip_low,
                                    clip_high=self.clip_high, ref_logp=ref_logp, **opts)
            (loss_out.loss * w + moe_mb.aux_loss() * w_tok).backward()
        norm, plain = gradient_norm(self.model)  # collective: FSDP's global norm, the same on every rank
        grad_norm = float(plain)
        check_gradient_norm(grad_norm, self.model, self.rollout_idx)
        clip_gradients(self.model, self.cfg.optim.max_grad_norm, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        # The global minibatch's loss and clip statistics: the loss function on every rank's log-probs.
        local = logp.detach().float().cpu()[: len(pos)]
        full_logp = gather_rows(local, pos, len(idx), d)
        with torch.no_grad():
            ref = data.ref_logp[idx] if data.ref_logp is not None else None
            glob = self.spec.fn(full_logp, data.old_logp[idx], data.adv[idx], mask_all, clip_low=self.clip_low,
                                clip_high=self.clip_high, ref_logp=ref, **opts)
        # MoE per-minibatch metrics (drift, aux terms): token-weighted means of the ranks' values; exact for
        # the drift (a mean over the tokens of every layer), the aux-loss values are per-rank batch statistics.
        keys = sorted(moe_mb.metrics)
        sums = all_reduce([tokens * moe_mb.metrics[key] for key in keys] + [tokens], d)
        moe_metrics = {key: v / sums[-1] if sums[-1] else 0.0 for key, v in zip(keys, sums)}
        return {"step": self.global_step, "epoch": epoch, "minibatch": j, "loss": float(glob.loss),
                "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], **glob.metrics,
                **moe_metrics}

    def _save_sharded(self, state: dict[str, Any]) -> str:
        """Collective: a torch.distributed.checkpoint of the shards (any number of processes resumes it)."""
        return save_distributed_checkpoint(self.out, self.rollout_idx, model=self.model, optimizer=self.optimizer,
                                           scheduler=self.scheduler, tokenizer=self.tokenizer,
                                           trainer_state=state, keep=self.cfg.train.keep_checkpoints,
                                           lora_save=self.cfg.lora.save)

    def _save_final_sharded(self, final: str) -> None:
        """Collective: final/ as one process writes it (a plain HF folder, LoRA merged, plus final_adapter/),
        streamed by rank 0 one layer at a time."""
        save_consolidated(self.model, self.tokenizer, final)
        if self.policy.is_lora:
            save_sharded_adapter(self.model, self.tokenizer, final + "_adapter")
