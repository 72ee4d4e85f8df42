"""Mixture-of-Experts support: router discovery, controls and recording (`gspo.moe.routing`), R2/R3 replay
(`gspo.moe.replay`), auxiliary losses (`gspo.moe.losses`) and expert-health metrics (`gspo.moe.metrics`),
importable from `gspo.moe` itself.

Layering inside the package: `replay`, `losses` and `metrics` use `routing`'s routers and records; `routing`
imports none of them.
"""

from gspo.moe.losses import load_balancing_loss, moe_aux_losses, router_z_loss
from gspo.moe.metrics import ExpertHealthTracker, load_per_expert, routing_drift, routing_metrics
from gspo.moe.replay import RoutingReplay
from gspo.moe.routing import (
    REPLAY_MODES,
    ROUTER_FAMILIES,
    RouterFamily,
    RouterInfo,
    RoutingRecorder,
    RoutingRecords,
    apply_router_controls,
    find_routers,
)
