"""GSPOTrainer: one RL step = the hops of docs/architecture.md, each timed.

    prompts -> rollout -> rewards -> advantages -> old logprobs -> loss + k minibatch updates -> weight sync

Deviations from the GSPO paper (Zheng et al., arXiv 2507.18071), all deliberate:
- The paper does not give group size, batch size, learning rate or max length; they come from the config.
- The sequence log-ratio is clamped to ±algorithm.max_log_ratio (default 10) before exp(), so a single
  sequence cannot turn the batch into NaN; within the paper's clip range this never binds.
- π_old is recomputed by the trainer by default (rollout.old_logp_source="trainer"); "engine" uses the
  sampler's logprobs instead (saves one forward pass; the gap is logged as logp_gap/*).
- Completions from which every reward function abstained get advantage 0 (they carry no signal) instead of
  poisoning their group's statistics.
- The minibatches of one rollout are a seeded random partition of its N completions (not whole groups),
  as in the paper's "split each rollout batch into minibatches".

With lora.enabled the policy is a peft model (gspo/models/policy.py, docs/lora.md): only adapters train, the
engine gets the merged weights, checkpoints hold adapter/ (+ merged model/), final/ is merged. The Policy
object owns those differences; this module has no LoRA branch.

Runs on one process, or data parallel on N (torchrun / accelerate launch, one per GPU; gloo on CPU): the
policy sharded with FSDP2 (gspo/training/fsdp.py), each rank sampling, scoring and computing log-probabilities
for a contiguous slice of B/N whole prompts, every metric over the global batch (docs/architecture.md,
"Several processes"). A one-process run takes none of those paths: its numbers are what they always were.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch

from gspo.algorithms import group_advantages
from gspo.algorithms.behaviour import behaviour_correction
from gspo.data import PromptSampler, build_dataset, describe_prompt_format, prompt_token_ids
from gspo.devices import to_device
from gspo.models.policy import Policy, is_sharded_checkpoint, save_final
from gspo.registry import LOSSES, STAGES, StageSpec
from gspo.rewards import RewardSet
from gspo.rollout import EngineInputs, build_engine
from gspo.rollout.base import RolloutBatch, SamplingSpec
from gspo.rollout.vllm_server import RolloutServerError
from gspo.training.checkpoint import load_training_state, resolve_checkpoint, save_checkpoint
from gspo.training.dist_checkpoint import (
    load_distributed_checkpoint,
)
from gspo.training.distributed import (
    Dist,
    barrier,
    fail_together,
    init_distributed,
)
from gspo.training.finite import (
    at_rollout,
    check_gradient_norm,
    check_logprobs,
    check_parameters,
    clip_gradients,
    gradient_norm,
)
from gspo.training.fsdp import root_unsharded
from gspo.training.logprobs import completion_logprobs
from gspo.training.metrics_log import HopTimer, MetricsWriter, format_summary, tracker_config
from gspo.training.moe_monitor import MoEMonitor
from gspo.training.optim import build_optimizer
from gspo.training.periodic_eval import PeriodicEval
from gspo.training.rollout_data import RolloutData, repeat_each
from gspo.training.rollout_producer import RolloutProducer
from gspo.training.sharded_steps import ShardedSteps
from gspo.training.summary import rl_summary

logger = logging.getLogger("gspo.trainer")


def wants_engine_logprobs(cfg: Any, rollout: int) -> bool:
    """Whether rollout `rollout` asks the engine for the sampled tokens' logprobs. Always when the update reads
    them (old_logp_source=engine, the behaviour correction, stale rollouts' mismatch metrics); else, for
    logp_gap/* (engine vs the trainer's π_old), on the first three rollouts (the initial weights, the first
    sync's reload, the first in-place copy) and every rollout.logp_gap_every-th. The loss itself uses the
    trainer's π_old recompute, and returning logprobs costs vLLM host time per token (docs/benchmarks.md)."""
    r, a = cfg.rollout, cfg.algorithm
    if r.old_logp_source == "engine" or r.max_staleness > 0 or a.tis_cap is not None or a.tis_mask_bound is not None:
        return True
    every = r.logp_gap_every
    return every > 0 and (rollout <= 3 or rollout % every == 0)


class GSPOTrainer(ShardedSteps, PeriodicEval):
    """The `rl` stage's loop: owns the policy (full or LoRA), its optimizer, the rollout engine, the reward set
    and the MoE monitor; `train()` runs `train.num_rollouts` calls of `step()` with checkpoints and returns
    the path of the final model. Built from a checked `Config` (everything it needs is in it)."""

    def __init__(self, cfg: Any) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.out = cfg.output_dir
        # Several processes (the launcher's WORLD_SIZE): the process group is ours, not accelerate's (its count
        # misses torchrun on CPU, gspo/launch.py), and so is the sharding (FSDP2 with one unit per decoder
        # layer, `shard_policy`); accelerate is kept for one process, whose numbers must not change.
        self.dist: Dist = init_distributed()
        d = self.dist
        if d.world > 1 and cfg.rollout.engine == "vllm_server":  # one server and one pusher per run for now
            raise RuntimeError(f"rollout.engine=vllm_server runs with one trainer process; this launch started "
                               f"{d.world}: launch one process, or use rollout.engine=vllm_colocate")
        if not d.main:  # progress, logs and files come from rank 0 only
            logging.getLogger("gspo").setLevel(logging.WARNING)
        barrier(d)  # rank 0 claimed the output folder (gspo.cli) before anyone writes into it
        os.makedirs(self.out, exist_ok=True)
        set_seed(cfg.seed)
        trackers = (list(cfg.logging.trackers) or None) if d.main else None
        self.accelerator = Accelerator(log_with=trackers, project_dir=self.out) \
            if not d.sharded or trackers else None
        self.device = d.device if d.sharded else self.accelerator.device

        resume = resolve_checkpoint(self.out, cfg.resume_from) if cfg.resume_from else None
        # Full or LoRA: the Policy owns every difference (loading, resuming, the KL reference, saving).
        # Rank 0 loads first: a `tiny:` model is built into output_dir on first load, once.
        if not d.main:
            barrier(d)
        self.policy = Policy.load(cfg, output_dir=self.out, resume=resume, engine=cfg.rollout.engine)
        if d.sharded and d.main:
            barrier(d)
        self.model, self.tokenizer = self.policy.model, self.policy.tokenizer
        # The KL reference is the stage's starting policy (cfg.model, also after a resume), frozen.
        self.ref_model = self.policy.reference(cfg.model, self.out) if cfg.algorithm.beta > 0 else None
        if d.sharded:  # before the MoE monitor reads the device and the optimizer sees the parameters
            self.model = self.model.to(d.device)
            if self.ref_model is not None:
                self.ref_model = self._shard(self.ref_model.to(d.device))
        self.spec = LOSSES.get(cfg.algorithm.name)
        self.clip_low, self.clip_high = cfg.clip_range()

        self.dataset = build_dataset(cfg.data, seed=cfg.seed)
        self.sampler = PromptSampler(len(self.dataset), cfg.rollout.prompts_per_step, seed=cfg.seed,
                                     shuffle=cfg.data.shuffle)
        base_dir = os.path.dirname(os.path.abspath(getattr(cfg, "source_path", None) or "."))
        # Dataset columns other than the prompt reach reward functions as keywords (TRL's contract).
        self.columns = [c for c in self.dataset.columns if c != "prompt"]
        self.rewards = RewardSet.from_specs(cfg.rewards, columns=self.columns, base_dir=base_dir)
        self._init_eval()
        logger.info("%s", describe_prompt_format(self.dataset.rows, cfg.data.chat_template, self.tokenizer))

        # Router controls (freeze / fp32) change which parameters train: before the optimizer exists.
        self.moe = MoEMonitor(self.model, cfg.moe)
        if d.sharded:  # fully_shard replaces the parameters: the optimizer is built on the shards
            self.model = self._shard(self.model)
            self.policy.model = self.model
        step_device = torch.device("cpu") if d.sharded and cfg.train.fsdp_cpu_offload else self.device
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim, cfg.total_optimizer_steps,
                                                         step_device)
        if not d.sharded:
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
                self.model, self.optimizer, self.scheduler)

        self.engine = build_engine(cfg.rollout, EngineInputs(
            self.policy.model_path, self.tokenizer, dtype=cfg.rollout_dtype, seed=cfg.seed,
            max_model_len=cfg.rollout.max_model_len or self._default_max_len(),
            model=self._unwrapped(),
            max_num_seqs=cfg.rollout.prompts_per_step // d.world * cfg.rollout.group_size))

        self.rollout_idx, self.global_step = 0, 0
        self.saved_rollout = -1  # the rollout of the newest checkpoint on disk
        if resume:
            if is_sharded_checkpoint(resume):  # written by N processes; DCP reshards it to this launch (any N)
                state = load_distributed_checkpoint(resume, model=self._unwrapped(), scheduler=self.scheduler,
                                                    optimizer=getattr(self.optimizer, "optimizer", self.optimizer))
            else:
                state = load_training_state(resume, self.optimizer, self.scheduler)
            self.rollout_idx, self.global_step = state["rollout"], state["step"]
            self.saved_rollout = self.rollout_idx
            self.sampler.load_state_dict(state["sampler"])
            self.moe.load_state_dict(state.get("moe", {}))
            logger.info("resumed from %s at rollout %d (optimizer step %d)", resume, self.rollout_idx,
                        self.global_step)
        if self.policy.engine_needs_first_sync:  # after the resume: a sharded checkpoint's weights load above
            self.engine.update_weights(self._unwrapped())
        self.metrics = MetricsWriter(self.out, self.accelerator,
                                     keep_until_rollout=self.rollout_idx if resume else None) if d.main else None
        # Rollouts generated when asked, or one ahead in the background (rollout.max_staleness=1).
        self.rollouts = RolloutProducer(self.engine, max_staleness=cfg.rollout.max_staleness,
                                        last_rollout=cfg.train.num_rollouts, draw=self._draw,
                                        sampling=self._rollout_sampling, sampler_state=self.sampler.state_dict)
        self._trained = True  # whether the current rollout's update ran (what a failure checkpoint keeps)
        if trackers:
            self.accelerator.init_trackers(cfg.logging.project, config=tracker_config(cfg.to_dict()))

    def _unwrapped(self) -> torch.nn.Module:
        """The policy module itself (accelerate's wrapper removed on one process; FSDP2 shards in place)."""
        return self.model if self.dist.sharded else self.accelerator.unwrap_model(self.model)

    def _default_max_len(self) -> int:
        # Every prompt is scanned once (a sample could miss the longest one, which vLLM would then reject
        # mid-run); set rollout.max_model_len to skip the scan on large datasets.
        longest = max(len(self._prompt_ids(r)) for r in self.dataset.rows)
        need = longest + self.cfg.rollout.max_new_tokens
        if self.eval_cfg is not None:  # the periodic evaluation samples on the same engine
            ev = self.eval_cfg  # its prompts rendered as the evaluation renders them (its own chat_template)
            need = max(need, max(len(prompt_token_ids(self.tokenizer, r["prompt"], ev.data.chat_template))
                                 for r in self.eval_rows) + ev.rollout.max_new_tokens)
        return need + 8

    # --- hop helpers ------------------------------------------------------------------------------------

    def _prompt_ids(self, row: dict[str, Any]) -> list[int]:
        return prompt_token_ids(self.tokenizer, row["prompt"], self.cfg.data.chat_template)

    def _sampling(self, rollout: int | None = None) -> SamplingSpec:
        r = self.cfg.rollout
        k = self.rollout_idx if rollout is None else rollout
        return SamplingSpec(n=r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                            top_p=r.top_p, top_k=r.top_k, seed=self.cfg.seed * 100_003 + k,
                            logprobs=wants_engine_logprobs(self.cfg, k))

    def _draw(self) -> tuple[list[dict[str, Any]], list[list[int]]]:
        """The next B prompts from the sampler (the same on every rank): all their rows, and the token ids of
        this rank's slice (`_rollout_sampling` gives its first prompt's index)."""
        rows = [self.dataset.rows[i] for i in self.sampler.next_indices()]
        lo, hi = self.dist.share(len(rows))
        return rows, [self._prompt_ids(r) for r in rows[lo:hi]]

    def _rollout_sampling(self, rollout: int) -> SamplingSpec:
        """Rollout `rollout`'s sampling for this rank's slice of prompts (first_prompt keeps the seeds)."""
        return replace(self._sampling(rollout), first_prompt=self.dist.share(self.cfg.rollout.prompts_per_step)[0])

    def _logp(self, batch: RolloutBatch, rows: torch.Tensor | None = None, *, model: Any = None,
              prompt_len: int | None = None) -> torch.Tensor:
        """Trainer log-probs of the batch's completion tokens (all rows, or the given row indices)."""
        ids, mask = batch.completion_ids, batch.mask
        prompt_ids = repeat_each(batch.prompt_ids, batch.group_size)
        if rows is not None:
            idx = rows.tolist()
            prompt_ids, ids, mask = [prompt_ids[i] for i in idx], ids[idx], mask[idx]
        model = model or self.model
        with root_unsharded(model):  # a no-op unless sharded
            return completion_logprobs(model, prompt_ids, ids, mask,  # moved to the model's device there
                                       group_size=1, pad_token_id=self.tokenizer.pad_token_id,
                                       temperature=self.cfg.rollout.temperature, top_k=self.cfg.rollout.top_k,
                                       top_p=self.cfg.rollout.top_p, prompt_len=prompt_len)

    def _trainer_state(self) -> Any:
        """What TRL-style rewards read from `trainer_state` (global_step, max_steps, epoch), plus the rollout."""
        return SimpleNamespace(global_step=self.global_step, max_steps=self.cfg.total_optimizer_steps,
                               epoch=self.sampler.epoch, rollout=self.rollout_idx)

    def _completions_for_rewards(self, rows: list[dict[str, Any]], batch: RolloutBatch) -> list[Any]:
        conversational = isinstance(rows[0]["prompt"], list)
        if conversational:
            return [[{"role": "assistant", "content": c}] for c in batch.completions]
        return list(batch.completions)

    # --- one RL step ------------------------------------------------------------------------------------

    def step(self) -> list[dict[str, Any]]:
        """One rollout and its k minibatch updates; returns the metric rows it wrote (one per optimizer step)."""
        g = self.cfg.rollout.group_size
        timer = HopTimer()
        self.rollout_idx += 1
        self._trained = False

        # Drawn and generated now, or started during the previous rollout (async); at_rollout: the HF engine's
        # logits guard raises without knowing the rollout.
        with timer("rollout"), at_rollout(self.rollout_idx):
            # Every rank draws the same B prompts (same seed) and samples its slice of whole prompts (`_draw`): a
            # group is never split, and with per-prompt seeds (first_prompt) the ranks' completions are the rollout's.
            rows, batch, staleness = self.rollouts.take(self.rollout_idx)
            lo, hi = self.dist.share(len(rows))
            if self.cfg.rollout.sleep_between_rollouts:  # free the engine's memory for the update (GPU)
                self.engine.sleep()

        with timer("rewards"):
            mine = rows[lo:hi]
            columns = {k: repeat_each([r.get(k) for r in mine], g) for k in self.columns}
            with fail_together(self.dist, "the rewards"):  # user code on this rank's share: stop every rank
                result = self.rewards(repeat_each([r["prompt"] for r in mine], g),
                                      self._completions_for_rewards(mine, batch),
                                      [ids[m.bool()].tolist() for ids, m in zip(batch.completion_ids, batch.mask)],
                                      columns, trainer_state=self._trainer_state())
            rewards, reward_metrics = result.rewards, result.metrics
            if self.dist.sharded:  # every rank gets the global batch: metrics and the update's rows
                all_ids = [self._prompt_ids(r) for r in rows]  # the global batch's prompts, every rank's slice
                batch, rewards, reward_metrics = self._gather_rollout(all_ids, batch, result)

        with timer("advantages"):  # groups are whole on every rank: the global batch's exact advantages
            adv = group_advantages(rewards, g, scale=self.spec.advantage, eps=self.cfg.algorithm.adv_eps)

        data = RolloutData(batch, rows, rewards, adv)
        self._total = batch.num_completions
        self._mine = list(range(lo * g, hi * g))  # this rank's completions (rows of the global batch)
        own = torch.tensor(self._mine) if self.dist.sharded else None
        with timer("old_logprobs"), self._inference(), \
                self.moe.old_pass(data.layout_mask(own), gather=self._gather_records):
            data.old_logp = self._old_logprobs(data, own)
            check_logprobs(data.old_logp, data.batch.mask, self.rollout_idx)
        behaviour = self._behaviour_correction(data)
        if self.cfg.algorithm.beta > 0:
            with timer("ref_logprobs"), self._inference(), self._reference():
                data.ref_logp = self._global_rows(
                    self._logp(batch, own, model=self.ref_model, prompt_len=data.prompt_len).float().cpu()
                    if own is not None else self._logp(batch, model=self.ref_model).float().cpu(), batch)
                check_logprobs(data.ref_logp, data.batch.mask, self.rollout_idx, "ref_logprobs")

        with timer("update"):
            update_rows = self._update(data)
        self._trained = True

        if self.rollouts.pending is not None:
            with timer("rollout_wait"):  # the next rollout's generation must end before the push (async)
                self.rollouts.before_weight_sync()
        with timer("weight_sync"):
            if self.cfg.rollout.sleep_between_rollouts:
                self.engine.wake_up()
            check_parameters(self.model, self.rollout_idx, "weight_sync")  # the engine never samples NaN weights
            self.engine.update_weights(self._unwrapped())
            self.rollouts.after_weight_sync()

        rollout_metrics = self._rollout_metrics(data, reward_metrics)
        rollout_metrics["rollout/staleness"] = staleness
        rollout_metrics.update(behaviour)
        stats = getattr(self.engine, "last_sync_stats", None)
        if stats is not None:  # vLLM: the sync's cost (s, GB, GB/s) next to the hop timings
            rollout_metrics.update(stats.metrics())
            rollout_metrics.update(getattr(self.engine, "last_push", {}))
        if self.eval_cfg is not None and self.rollout_idx % self.cfg.train.eval_every == 0:
            with timer("eval"):  # after the weight sync: the engine samples the updated policy
                rollout_metrics.update(self.evaluate())
        with timer("moe_metrics"):
            rollout_metrics.update(self.moe.rollout_metrics(self.rollout_idx))
        rollout_metrics.update(timer.metrics())
        rows_out = []
        for r in update_rows:
            row = {"step": r.pop("step"), "rollout": self.rollout_idx, **r, **rollout_metrics}
            if self.metrics is not None:  # rank 0
                self.metrics.write(row)
            rows_out.append(row)
        if self.metrics is not None:
            self._maybe_write_samples(data)
        return rows_out

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """No-grad logprob passes (π_old, reference) run the policy in eval mode: `_update` leaves it in train
        mode, where dropout (and any train-only behaviour) would make π_old differ from the sampler's π."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _reference(self) -> Any:
        """Context in which `self._logp(..., model=self.ref_model)` is the KL reference's logp."""
        if self.ref_model is None:
            return self.policy.reference_context(self._unwrapped())  # no accelerator on a sharded run
        return nullcontext()

    def _old_logprobs(self, data: RolloutData, own: torch.Tensor | None = None) -> torch.Tensor:
        """π_old's logp: the trainer's recompute, or the sampler's (rollout.old_logp_source=engine). With the
        engine's, the trainer pass still runs when MoE needs π_old's routing (metrics, R2 replay). `own`:
        this rank's rows (several processes), computed here and gathered into the global batch's."""
        batch, engine = data.batch, self.cfg.rollout.old_logp_source == "engine"
        if engine and batch.logp is None:
            raise RuntimeError(f"rollout.old_logp_source=engine but engine {self.cfg.rollout.engine!r} returned "
                               "no logprobs")
        if not engine or self.moe.needs_old_routing:
            if own is None:
                data.trainer_logp = self._logp(batch).float().cpu()
            else:
                data.trainer_logp = self._global_rows(
                    self._logp(batch, own, prompt_len=data.prompt_len).float().cpu(), batch)
        return batch.logp.float() if engine else data.trainer_logp

    def _behaviour_correction(self, data: RolloutData) -> dict[str, float]:
        """algorithm.tis_cap / tis_mask_bound: weight each sequence's advantage by w_i * m_i against the engine's
        sampler (gspo/algorithms/behaviour.py, docs/rollout.md); the mismatch metrics also whenever rollouts
        may be stale (max_staleness > 0). Returns the metrics ({} when neither applies)."""
        a, b = self.cfg.algorithm, data.batch
        correct = a.tis_cap is not None or a.tis_mask_bound is not None
        if not correct and self.cfg.rollout.max_staleness == 0:
            return {}
        if b.logp is None or data.trainer_logp is None:
            if correct:
                raise RuntimeError("algorithm.tis_cap / tis_mask_bound need the engine's logprobs and the "
                                   "trainer's pi_old recompute (rollout.old_logp_source=trainer)")
            return {}
        c = behaviour_correction(data.trainer_logp, b.logp, b.mask, cap=a.tis_cap, bound=a.tis_mask_bound)
        if correct:
            data.adv = data.adv * c.factor.to(data.adv.dtype)
            return c.metrics
        return {k: v for k, v in c.metrics.items() if k.startswith("mismatch/")}

    def _update(self, data: RolloutData) -> list[dict[str, Any]]:
        """k minibatch updates per epoch over the rollout (GSPO paper §5.1: 4 minibatches)."""
        a, n = self.cfg.algorithm, data.batch.num_completions
        k = a.num_minibatches
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.rollout_idx)
        loss_fn = self.spec.fn
        # max_completion_length is Dr.GRPO's constant normalizer (G · L_max); the other losses ignore it.
        opts = {"max_log_ratio": a.max_log_ratio, "max_completion_length": self.cfg.rollout.max_new_tokens,
                "beta": a.beta, "kl_estimator": a.kl_estimator}
        out = []
        self.model.train()
        for epoch in range(a.num_epochs):
            perm = torch.randperm(n, generator=gen)
            for j, idx in enumerate(perm.chunk(k)):
                if self.dist.sharded:
                    out.append(self._sharded_minibatch(data, idx, epoch, j, opts))
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                # Replay (R2) and gradient checkpointing need backward inside the MoE context.
                with self.moe.update_pass(idx, data.layout_mask(idx)) as moe_mb:
                    logp = self._logp(data.batch, idx, prompt_len=data.prompt_len)
                    dev = logp.device
                    mask = to_device(data.batch.mask[idx], dev)  # copies without a host wait (gspo.devices)
                    ref_logp = to_device(data.ref_logp[idx], dev) if data.ref_logp is not None else None
                    loss_out = loss_fn(logp, to_device(data.old_logp[idx], dev), to_device(data.adv[idx], dev), mask,
                                       clip_low=self.clip_low, clip_high=self.clip_high, ref_logp=ref_logp,
                                       **opts)
                    self.accelerator.backward(loss_out.loss + moe_mb.aux_loss())
                self.accelerator.unscale_gradients()  # a no-op unless a loss scaler (fp16) is in use
                norm, plain = gradient_norm(self.model)
                # The minibatch's one device-to-host transfer: loss, norm and the loss's metrics together.
                loss_value, grad_norm = loss_out.fetch(loss_out.loss, plain)
                # A NaN gradient would turn every weight into NaN in one step (clipping spreads it): stop here.
                check_gradient_norm(grad_norm, self.model, self.rollout_idx)
                clip_gradients(self.model, self.cfg.optim.max_grad_norm, norm)
                self.optimizer.step()
                self.scheduler.step()
                self.global_step += 1
                out.append({"step": self.global_step, "epoch": epoch, "minibatch": j, "loss": loss_value,
                            "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], **loss_out.metrics,
                            **moe_mb.metrics})
        return out

    def _rollout_metrics(self, data: RolloutData, reward_metrics: dict[str, float]) -> dict[str, Any]:
        return {**data.reward_and_length_metrics(), "updates_per_rollout": self.cfg.optimizer_steps_per_rollout,
                "clip/low": self.clip_low, "clip/high": self.clip_high, **reward_metrics, **self.policy.metrics,
                **data.logp_gap_metrics()}

    def _maybe_write_samples(self, data: RolloutData) -> None:
        lg = self.cfg.logging
        if lg.sample_every > 0 and self.rollout_idx % lg.sample_every == 0:
            self.metrics.write_samples(self.rollout_idx, data.samples(lg.num_samples))

    # --- loop, checkpoints ------------------------------------------------------------------------------

    def save(self) -> str:
        self.saved_rollout = self.rollout_idx
        # The sampler before any prompts drawn for a rollout not yet trained on (async: the one generating).
        sampler = self.rollouts.sampler_state_for_checkpoint(trained=True)
        state = {"rollout": self.rollout_idx, "step": self.global_step, "sampler": sampler,
                 "moe": self.moe.state_dict()}
        if self.dist.sharded:
            return self._save_sharded(state)
        return save_checkpoint(self.out, self.rollout_idx, model=self.accelerator.unwrap_model(self.model),
                               tokenizer=self.tokenizer, optimizer=self.optimizer, scheduler=self.scheduler,
                               trainer_state=state, keep=self.cfg.train.keep_checkpoints, lora_save=self.cfg.lora.save)

    def _save_after_server_failure(self) -> str:
        """A checkpoint of the last rollout whose update ran; prompts drawn for rollouts not trained on are
        drawn again after the resume (gspo/training/rollout_producer.py). Stops a server this run started."""
        state = self.rollouts.sampler_state_for_checkpoint(trained=self._trained)
        self.rollouts.close()
        if not self._trained:
            self.rollout_idx -= 1
        self.sampler.load_state_dict(state)
        self.engine.close()
        if self.rollout_idx == 0:
            return "no rollout was trained on: nothing to resume"
        self.save()
        return f"checkpoint saved at rollout {self.rollout_idx}"

    def train(self) -> str:
        """Run until train.num_rollouts; returns the final checkpoint's model directory."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        bar = tqdm(total=t.num_rollouts, initial=self.rollout_idx,
                   disable=not (self.cfg.logging.progress and self.dist.main), desc="gspo", unit="rollout")
        try:
            while self.rollout_idx < t.num_rollouts:
                rows = self.step()
                bar.update(1)
                bar.set_postfix_str(format_summary(rows[-1]))
                if t.save_every and self.rollout_idx % t.save_every == 0:
                    self.save()
        except RolloutServerError as e:
            raise RolloutServerError(f"{e}; {self._save_after_server_failure()}") from None
        bar.close()
        self.rollouts.close()
        if self.saved_rollout != self.rollout_idx:  # e.g. a run resumed at its end has nothing new to save
            self.save()
        final = os.path.join(self.out, "final")
        if self.dist.sharded:
            self._save_final_sharded(final)
        else:
            save_final(self.accelerator.unwrap_model(self.model), self.tokenizer, final)
        barrier(self.dist)  # every rank done with final/ before any engine shuts down
        self.engine.close()
        if self.accelerator is not None:
            self.accelerator.end_training()
        return final

def run_rl(cfg: Any) -> str:
    """The `rl` stage: GSPO (or a baseline named by algorithm.name) on the configured rewards."""
    return GSPOTrainer(cfg).train()


STAGES.register("rl", StageSpec(
    name="rl", runner=run_rl, help="GSPO (or a baseline loss) on the configured rewards",
    sections=("rollout", "algorithm", "optim", "train", "moe", "lora"), consumes=("policy",),
    produces="policy", output="final", needs_rewards=True, summary=rl_summary,
    max_processes=None))  # data parallel over any launch (FSDP2; see the module docstring)
