"""The trainer's MoE hooks, at the hops where they belong (see docs/moe.md).

- start: router controls (freeze, fp32) before the optimizer is built;
- hop 5 (old logprobs): record π_old's routing of the rollout's completion tokens -> expert load, imbalance,
  entropy, dead experts, collapse alarm (`moe/*`, once per rollout);
- hops 6-7 (each minibatch): R2 replay of π_old's experts (router softmax still differentiable), the aux /
  z losses added to the policy loss, and routing drift of π_θ against π_old for the same tokens after the
  updates so far (minibatch j sees j-1 updates; the first minibatch's drift is 0 by construction).

A model without routers (dense) gets a monitor whose hooks do nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from gspo.devices import to_device
from gspo.moe import (
    ExpertHealthTracker,
    RoutingRecorder,
    RoutingRecords,
    RoutingReplay,
    apply_router_controls,
    moe_aux_losses,
    routing_drift,
    routing_metrics,
)

logger = logging.getLogger("gspo.moe")


def completion_layout_mask(mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[N, T] completion mask -> [N, P + T] mask over the logprob pass's token layout (prompt part 0)."""
    return torch.cat([torch.zeros(mask.shape[0], prompt_len, dtype=torch.bool, device=mask.device),
                      mask.bool()], dim=1)


class _Minibatch:
    """What one minibatch pass recorded: `aux_loss()` before backward, `metrics` after the pass."""

    def __init__(self, monitor: MoEMonitor, rec: RoutingRecorder | None, layout_mask: torch.Tensor) -> None:
        self.monitor, self.rec, self.layout_mask = monitor, rec, layout_mask
        self.records: RoutingRecords | None = None
        self.metrics: dict[str, float] = {}

    def aux_loss(self) -> torch.Tensor | float:
        if self.rec is None:
            return 0.0
        self.records = self.rec.records(mask=to_device(self.layout_mask, self.monitor.device))
        if not self.monitor.aux_on:
            return 0.0
        loss, metrics = moe_aux_losses(self.records, self.monitor.cfg)
        self.metrics.update(metrics)
        return loss


class MoEMonitor:
    """The trainer's one handle on MoE routing (the `moe` config section): records routing during the π_old
    pass and each update, replays it when `moe.routing_replay` asks, and turns the records into auxiliary
    losses, drift and expert-health metrics. On a dense model every method is a cheap no-op."""

    def __init__(self, model: torch.nn.Module, moe_cfg: Any) -> None:
        self.cfg = moe_cfg
        self.model = model
        self.routers = apply_router_controls(model, moe_cfg)
        self.device = next(model.parameters()).device
        # The logprob passes call the decoder directly (lm_head runs on completion positions only), so the
        # recorder and replay read each call's [B, S] layout from the decoder's inputs.
        self.forward_module = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.active = bool(self.routers)
        self.replay = moe_cfg.routing_replay if self.active else "none"
        if self.replay == "r3":  # config validation refuses it; a config built in code gets the same answer
            raise ValueError("moe.routing_replay=r3: the rollout engine does not return its routed experts; use r2")
        self.aux_on = self.active and (moe_cfg.aux_loss_coef > 0 or moe_cfg.router_z_loss_coef > 0)
        self.metrics_on = self.active and moe_cfg.metrics
        self.tracker = ExpertHealthTracker(moe_cfg.dead_expert_window, moe_cfg.collapse_threshold) \
            if self.metrics_on else None
        self.old: RoutingRecords | None = None
        if self.active:
            r = self.routers[0]
            logger.info("MoE policy: %d router layers (%s), %d experts, top-%d; replay=%s, aux=%s",
                        len(self.routers), r.family, r.num_experts, r.top_k, self.replay, self.aux_on)

    @property
    def needs_old_routing(self) -> bool:
        """Whether π_old's forward pass must run for MoE (metrics or R2 replay), whatever supplies old_logp."""
        return self.metrics_on or self.replay == "r2"

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()} if self.tracker is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.tracker is not None and "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])

    @contextmanager
    def old_pass(self, layout_mask: torch.Tensor, gather: Any = None) -> Iterator[None]:
        """Wrap π_old's forward over the whole rollout; keeps its routing for metrics, drift and replay.
        `gather`: records of this process's rows -> the global batch's (several processes; every rank calls
        it, it is a collective)."""
        self.old = None
        if not self.needs_old_routing:
            yield
            return
        with RoutingRecorder(self.forward_module, routers=self.routers, entropy=self.metrics_on) as rec:
            yield
        self.old = rec.records(mask=to_device(layout_mask, self.device))
        if gather is not None:
            self.old = gather(self.old)

    def rollout_metrics(self, rollout: int) -> dict[str, float]:
        if not self.metrics_on or self.old is None:
            return {}
        return {**routing_metrics(self.old), **self.tracker.update(self.old, step=rollout)}

    @contextmanager
    def update_pass(self, rows: torch.Tensor, layout_mask: torch.Tensor) -> Iterator[_Minibatch]:
        """Wrap one minibatch's forward + backward: replay, recording for aux loss and drift."""
        old = self.old.select(rows) if self.old is not None else None  # π_old's routing of these rows
        replay = RoutingReplay(self.forward_module, old, self.routers) if self.replay == "r2" else nullcontext()
        record = self.metrics_on or self.aux_on
        rec = RoutingRecorder(self.forward_module, keep_logits=self.aux_on, entropy=False, routers=self.routers) \
            if record else None
        mb = _Minibatch(self, rec, layout_mask)
        with replay, (rec if rec is not None else nullcontext()):
            yield mb
        if self.metrics_on and old is not None:
            if mb.records is None:
                mb.records = rec.records(mask=to_device(layout_mask, self.device))
            mb.metrics.update(routing_drift(old, mb.records))
        mb.records = None  # drop the logits' graph
