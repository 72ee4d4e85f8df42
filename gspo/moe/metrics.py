"""Expert-health metrics over recorded routing (`gspo.moe.RoutingRecords`): load, imbalance, entropy, dead
experts, collapse alarm, routing drift. Pure functions of the records except `ExpertHealthTracker`, which keeps
a window of per-rollout loads.

Definitions (per router layer, over the valid tokens of the records; k = top_k, E = num_experts):
- load_i = number of (token, slot) assignments to expert i (sum over i = k * tokens);
- load_max_over_mean = max_i load_i / mean_i load_i (1 = perfectly balanced, E/k = all tokens on k experts);
- load_cv = std_i load_i / mean_i load_i (population std; 0 = balanced);
- entropy = mean over tokens of H(router distribution) / log E (1 = uniform router, 0 = one-hot);
- dead_experts = experts with load 0 (in this batch; the tracker counts over a window of rollouts);
- routing_drift = 1 - mean over tokens of |old top-k ∩ new top-k| / k (GSPO paper §5.3 reports ~10% per update).
Summaries: `moe/load_max_over_mean` is the max over layers (the worst layer raises the alarm), `moe/load_cv`,
`moe/routing_entropy` and `moe/routing_drift` are means over layers, `moe/dead_experts` is a sum over layers.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # runtime import would be circular: gspo.moe re-exports this module
    from gspo.moe.routing import RoutingRecords

logger = logging.getLogger("gspo.moe")


def load_per_expert(records: RoutingRecords) -> torch.Tensor:
    """Token counts per expert over the valid tokens: [num_layers, num_experts] float, on the records' device
    (for plots/trackers). One scatter-add, no host sync."""
    idx = torch.stack(records.indices).flatten(1, 2)  # [L, B*S, k]
    weight = (records.mask.reshape(1, -1, 1) & (idx >= 0)).float()
    load = torch.zeros(idx.shape[0], records.num_experts, device=idx.device)
    return load.scatter_add_(1, idx.clamp_min(0).flatten(1), weight.flatten(1))


def load_stats(load: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer imbalance of a [L, E] load: max/mean, coefficient of variation, dead count (each [L])."""
    safe = load.mean(dim=-1).clamp_min(1e-12)
    return {"load_max_over_mean": load.max(dim=-1).values / safe, "load_cv": load.std(dim=-1, unbiased=False) / safe,
            "dead_experts": (load == 0).sum(dim=-1).float()}


def _masked_layer_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[L, B, S] values -> [L] means over the tokens where mask [B, S] is True (NaN when none)."""
    m = mask.to(values.dtype)
    return (values * m).flatten(1).sum(-1) / m.sum()


def routing_metrics(records: RoutingRecords, num_experts: int | None = None,
                    top_k: int | None = None) -> dict[str, float]:
    """`moe/...` floats for one batch: per layer (`moe/layer{i}/...`) and summarized (see module docstring).

    num_experts / top_k default to the records'; given, they must agree (catches mixed-up records).
    All reductions stay on the device; one transfer at the end (cheap to leave on during GPU training).
    """
    for name, given, have in (("num_experts", num_experts, records.num_experts), ("top_k", top_k, records.top_k)):
        if given is not None and int(given) != have:
            raise ValueError(f"routing_metrics: {name}={given} but the records have {name}={have}")
    stats = load_stats(load_per_expert(records))
    keys = list(stats)
    rows = [stats[key] for key in keys]
    if records.entropy is not None:
        keys.append("entropy")
        rows.append(_masked_layer_mean(torch.stack(records.entropy).float(), records.mask))
    table = torch.stack(rows).tolist()  # [metric][layer]: the single host sync
    tokens = float(records.mask.sum())
    out: dict[str, float] = {}
    for key, vals in zip(keys, table):
        for layer, v in zip(records.layers, vals):
            out[f"moe/layer{layer}/{key}"] = v
    by = dict(zip(keys, table))
    out["moe/load_max_over_mean"] = max(by["load_max_over_mean"])
    out["moe/load_cv"] = sum(by["load_cv"]) / len(records.layers)
    out["moe/dead_experts"] = sum(by["dead_experts"])
    if "entropy" in by:
        out["moe/routing_entropy"] = sum(by["entropy"]) / len(records.layers)
    out["moe/tokens"] = tokens
    return out


def topk_overlap(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """|old ∩ new| / k per token for top-k index sets [..., k] (indices within a set are distinct)."""
    k = old.shape[-1]
    return (old.unsqueeze(-1) == new.unsqueeze(-2)).any(-1).sum(-1).float() / k


def routing_drift(records_old: RoutingRecords, records_new: RoutingRecords) -> dict[str, float]:
    """Fraction of top-k expert choices that changed for the same tokens between two passes.

    Both records must share the [B, S] layout; tokens valid in both count. Keys: `moe/layer{i}/routing_drift`
    and `moe/routing_drift` (mean over layers) compare the experts actually used. When `records_new` was made
    under replay, `moe/router_drift` also compares the new router's own top-k with the old experts (how far
    the router would have moved had it not been overridden).
    """
    if records_old.layers != records_new.layers:
        raise ValueError(f"routing_drift: layers differ ({records_old.layers} vs {records_new.layers})")
    if tuple(records_old.mask.shape) != tuple(records_new.mask.shape):
        raise ValueError(f"routing_drift: token layouts differ ({tuple(records_old.mask.shape)} vs "
                         f"{tuple(records_new.mask.shape)}); record both passes on the same padded batch")
    valid = records_old.mask & records_new.mask.to(records_old.mask.device)
    old = torch.stack(records_old.indices)
    rows = [1.0 - _masked_layer_mean(topk_overlap(old, torch.stack(records_new.indices).to(old.device)), valid)]
    if records_new.router_indices is not None:
        own = torch.stack(records_new.router_indices).to(old.device)
        rows.append(1.0 - _masked_layer_mean(topk_overlap(old, own), valid))
    table = torch.stack(rows).nan_to_num(0.0).tolist()  # one host sync
    out = {f"moe/layer{layer}/routing_drift": d for layer, d in zip(records_old.layers, table[0])}
    out["moe/routing_drift"] = sum(table[0]) / len(table[0])
    if len(table) > 1:
        out["moe/router_drift"] = sum(table[1]) / len(table[1])
    return out


class ExpertHealthTracker:
    """Expert health across rollouts: dead experts over a window and a collapse alarm.

    update(records or load [L, E]) once per rollout returns `moe/dead_experts` (number of (layer, expert)
    pairs with no token in any of the last `window` rollouts), `moe/layer{i}/dead_experts` on the same window
    and `moe/collapse_alarm` (1.0 while the worst layer's max/mean load is >= collapse_threshold). A warning is
    logged on logger "gspo.moe" when the imbalance crosses the threshold upwards, once per crossing.
    """

    def __init__(self, window: int, collapse_threshold: float, layers: list[int] | None = None) -> None:
        if window < 1:
            raise ValueError(f"ExpertHealthTracker: window (moe.dead_expert_window) must be >= 1, got {window}")
        if collapse_threshold <= 1:
            raise ValueError(
                f"ExpertHealthTracker: collapse_threshold (moe.collapse_threshold) is a max/mean load ratio and "
                f"must be > 1, got {collapse_threshold}"
            )
        self.window = window
        self.collapse_threshold = float(collapse_threshold)
        self.layers = layers
        self._loads: deque[torch.Tensor] = deque(maxlen=window)
        self.collapsed = False
        self.alarms = 0

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to count dead experts and alarms exactly as an uninterrupted run."""
        return {"loads": [t.tolist() for t in self._loads], "layers": self.layers, "collapsed": self.collapsed,
                "alarms": self.alarms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loads = deque((torch.tensor(t, dtype=torch.float32) for t in state["loads"]), maxlen=self.window)
        self.layers, self.collapsed, self.alarms = state["layers"], state["collapsed"], state["alarms"]

    def update(self, records_or_load: RoutingRecords | torch.Tensor, step: int | None = None) -> dict[str, float]:
        if isinstance(records_or_load, torch.Tensor):
            load = records_or_load.detach().float().cpu()
        else:
            load = load_per_expert(records_or_load).cpu()
            self.layers = list(records_or_load.layers)
        if self._loads and self._loads[0].shape != load.shape:
            raise ValueError(f"ExpertHealthTracker.update: load shape {tuple(load.shape)} changed from "
                             f"{tuple(self._loads[0].shape)}")
        self._loads.append(load)
        layers = self.layers or list(range(load.shape[0]))
        dead = (torch.stack(list(self._loads)).sum(0) == 0)  # [L, E]: no token over the window
        out = {f"moe/layer{lay}/dead_experts": float(dead[i].sum()) for i, lay in enumerate(layers)}
        out["moe/dead_experts"] = float(dead.sum())
        ratio = load_stats(load)["load_max_over_mean"]
        worst = int(ratio.argmax())
        over = float(ratio[worst]) >= self.collapse_threshold
        if over and not self.collapsed:
            self.alarms += 1
            logger.warning(
                "expert collapse alarm%s: layer %d load max/mean = %.2f >= threshold %.2f (dead experts over "
                "the last %d rollouts: %d); see docs/moe.md",
                f" at step {step}" if step is not None else "", layers[worst], float(ratio[worst]),
                self.collapse_threshold, len(self._loads), int(dead.sum()),
            )
        self.collapsed = over
        out["moe/collapse_alarm"] = 1.0 if over else 0.0
        return out
