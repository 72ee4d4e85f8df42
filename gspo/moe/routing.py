"""MoE router machinery: find the routers, control them, record their choices, replay them.

Four jobs, one per section:
- `find_routers(model)`: every top-k router of a Hugging Face MoE model (through peft wrappers too), found
  by its class through the `ROUTER_FAMILIES` registry. A family entry knows how the router turns its logits
  into the distribution it picks from and into the combine weights of a given set of experts.
- `apply_router_controls(model, moe_cfg)`: freeze the routers, keep them in fp32, check the options.
- `RoutingRecorder`: forward hooks that record, per router layer, the top-k expert indices [B, S, k], the
  normalized router entropy [B, S] and (on request) the router logits with their graph, for the aux losses.
- `RoutingReplay` (in `gspo.moe.replay`): R2/R3 routing replay. Forces given experts in a forward pass
  while the combine weights stay the current router's probabilities at those experts (differentiable,
  renormalized as the family does), so the router keeps its gradient.

Auxiliary losses (`gspo.moe.losses.moe_aux_losses`) are computed from recorded logits and added by the trainer rather
than through transformers' `output_router_logits` path, because that path (a) only adds the loss when
`labels` are passed, which an RL trainer does not do; (b) copies `router_aux_loss_coef` into the model at
construction, so changing the config afterwards silently has no effect; (c) counts the router's own top-k,
not the experts actually used under replay; (d) does not exist for DeepSeek-V3. Metrics over the records
(load, imbalance, entropy, dead experts, drift) live in `gspo.moe.metrics`; `gspo.moe` re-exports all three.

Hooks: each router gets one pre-hook and one forward hook (installed on first use, no-ops while idle)
that run, in this order, the fp32 cast, the active replay, then every active recorder. A single dispatch
keeps that order fixed no matter in which order contexts are entered.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch
import torch.nn.functional as F

from gspo.devices import to_device
from gspo.registry import Registry

logger = logging.getLogger("gspo.moe")

REPLAY_MODES = ("none", "r2", "r3")

# -- Router families -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterFamily:
    """How one transformers router class routes.

    probs(router, logits [n, E]) -> [n, E] fp32: the distribution the router's top-k is read from
        (softmax for most families, normalized sigmoid scores for DeepSeek-V3); used for entropy and aux loss.
    combine(router, logits [n, E], idx [n, k]) -> [n, k]: the combine weights the family would give the
        experts `idx`, as a differentiable function of the logits (used by replay).
    z_loss: whether the router is a softmax over all experts, where the ST-MoE z-loss applies.
    """

    name: str
    router_class: str
    probs: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
    combine: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    z_loss: bool = True


ROUTER_FAMILIES: Registry[RouterFamily] = Registry("MoE router family")


def _softmax_probs(router: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def _softmax_topk_combine(router: torch.nn.Module, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # Qwen2/3-MoE, OLMoE: softmax over all experts, gather the chosen ones, renormalize if norm_topk_prob.
    w = torch.softmax(logits.float(), dim=-1).gather(-1, idx)
    if getattr(router, "norm_topk_prob", False):
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def _mixtral_combine(router: torch.nn.Module, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # Mixtral always renormalizes the top-k probabilities.
    w = torch.softmax(logits.float(), dim=-1).gather(-1, idx)
    return w / w.sum(dim=-1, keepdim=True)


def _gpt_oss_combine(router: torch.nn.Module, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # GPT-OSS: softmax over the k chosen logits only.
    return torch.softmax(logits.gather(-1, idx).float(), dim=-1)


def _sigmoid_probs(router: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(logits.float())
    return s / s.sum(dim=-1, keepdim=True)


def _deepseek_v3_combine(router: torch.nn.Module, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # DeepSeek-V3: sigmoid scores of the chosen experts (the correction bias only steers the choice),
    # optionally renormalized, times routed_scaling_factor.
    w = torch.sigmoid(logits.float()).gather(-1, idx)
    if getattr(router, "norm_topk_prob", False):
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * float(getattr(router, "routed_scaling_factor", 1.0))


for _fam in (
    RouterFamily("qwen3_moe", "Qwen3MoeTopKRouter", _softmax_probs, _softmax_topk_combine),
    RouterFamily("qwen2_moe", "Qwen2MoeTopKRouter", _softmax_probs, _softmax_topk_combine),
    RouterFamily("olmoe", "OlmoeTopKRouter", _softmax_probs, _softmax_topk_combine),
    RouterFamily("mixtral", "MixtralTopKRouter", _softmax_probs, _mixtral_combine),
    RouterFamily("gpt_oss", "GptOssTopKRouter", _softmax_probs, _gpt_oss_combine),
    RouterFamily("deepseek_v3", "DeepseekV3TopkRouter", _sigmoid_probs, _deepseek_v3_combine, z_loss=False),
):
    ROUTER_FAMILIES.register(_fam.name, _fam)


@dataclass
class RouterInfo:
    """One router: its decoder layer index, module, qualified name, expert count, top-k and family."""

    layer: int
    module: torch.nn.Module
    name: str
    num_experts: int
    top_k: int
    family: RouterFamily

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters(recurse=False))


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def find_routers(model: torch.nn.Module) -> list[RouterInfo]:
    """Every registered router in `model` (a plain HF model or a peft wrapper), sorted by layer.

    Raises ValueError naming the model class and the supported families when there is none.
    """
    by_class = {fam.router_class: fam for _, fam in ROUTER_FAMILIES.items()}
    found: list[RouterInfo] = []
    for name, module in model.named_modules():
        fam = by_class.get(type(module).__name__)
        if fam is None:
            continue
        m = _LAYER_RE.search(name)
        layer = int(m.group(1)) if m else len(found)
        found.append(RouterInfo(layer, module, name, int(module.num_experts), int(module.top_k), fam))
    if not found:
        raise ValueError(
            f"find_routers: no MoE router in {type(model).__name__}; supported router families: "
            f"{', '.join(ROUTER_FAMILIES.names())} (register a RouterFamily in gspo.moe.ROUTER_FAMILIES)"
        )
    found.sort(key=lambda r: r.layer)
    return found


# -- Hook dispatch (one pre-hook + one forward hook per router) ----------------------------------------------


@dataclass
class _RouterState:
    info: RouterInfo
    fp32: bool = False
    replay: Any = None  # the active gspo.moe.replay.RoutingReplay, if any
    recorders: list[RoutingRecorder] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)


def _state(info: RouterInfo) -> _RouterState:
    st = info.module.__dict__.get("_gspo_moe_state")
    if st is None:
        st = _RouterState(info)
        st.handles.append(info.module.register_forward_pre_hook(_pre_hook))
        st.handles.append(info.module.register_forward_hook(_post_hook))
        info.module.__dict__["_gspo_moe_state"] = st
    return st


def _in_backward() -> bool:
    # True inside autograd's backward (where activation checkpointing re-runs the forward).
    return torch._C._current_graph_task_id() >= 0


def _pre_hook(module: torch.nn.Module, args: tuple) -> tuple | None:
    st: _RouterState = module.__dict__["_gspo_moe_state"]
    if st.fp32 and args and args[0].dtype != torch.float32:
        # fp32 router: the input is upcast so the router matmul and softmax run in fp32.
        return (args[0].float(), *args[1:])
    return None


def _post_hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    st: _RouterState = module.__dict__["_gspo_moe_state"]
    if st.replay is None and not st.recorders:
        return None
    logits, scores, indices = output[0], output[1], output[2]
    router_indices = indices
    if st.replay is not None:
        forced = st.replay._next(st.info, logits.shape[0], indices)
        weights = st.info.family.combine(module, logits, forced).to(scores.dtype)
        scores, indices = weights, forced.to(indices.dtype)
    for rec in st.recorders:
        rec._capture(st.info, logits, indices, router_indices)
    if st.replay is None:
        return None
    return (logits, scores, indices, *output[3:])


# -- Router controls -----------------------------------------------------------------------------------------


def apply_router_controls(model: torch.nn.Module, moe_cfg: Any) -> list[RouterInfo]:
    """Apply `moe_cfg`'s router options to `model` in place and return its routers.

    moe_cfg (duck-typed): freeze_router (requires_grad False on router weights), router_fp32 (router
    parameters and matmul in fp32; call after any dtype cast of the model and before creating the optimizer),
    router_z_loss_coef (> 0 only for families whose router is a softmax over all experts), routing_replay in
    REPLAY_MODES. aux_loss_coef and
    router_z_loss_coef are applied by the trainer through `moe_aux_losses` (see the module docstring).
    """
    routers = find_routers(model)
    replay = getattr(moe_cfg, "routing_replay", "none")
    if replay not in REPLAY_MODES:
        raise ValueError(f"moe.routing_replay={replay!r} is not valid; choose one of {REPLAY_MODES}")
    for name in ("aux_loss_coef", "router_z_loss_coef"):
        if float(getattr(moe_cfg, name, 0.0) or 0.0) < 0:
            raise ValueError(f"moe.{name} must be >= 0, got {getattr(moe_cfg, name)}")
    if float(getattr(moe_cfg, "router_z_loss_coef", 0.0) or 0.0) > 0:
        bad = sorted({r.family.name for r in routers if not r.family.z_loss})
        if bad:
            ok = [n for n, f in ROUTER_FAMILIES.items() if f.z_loss]
            raise ValueError(
                f"moe.router_z_loss_coef > 0 but the router of {bad} is not a softmax over experts; "
                f"z-loss applies to: {', '.join(ok)}"
            )
    freeze = bool(getattr(moe_cfg, "freeze_router", False))
    fp32 = bool(getattr(moe_cfg, "router_fp32", False))
    for r in routers:
        for p in r.parameters():
            if fp32:
                p.data = p.data.float()
            if freeze:
                p.requires_grad_(False)
        if fp32:
            _state(r).fp32 = True
    logger.info(
        "router controls: %d routers (%s), freeze=%s fp32=%s replay=%s",
        len(routers), routers[0].family.name, freeze, fp32, replay,
    )
    return routers


# -- Recording -----------------------------------------------------------------------------------------------


@dataclass
class RoutingRecords:
    """Routing of a batch in its [B, S] token layout.

    indices[l]: [B, S, k] long, the experts used by router layer `layers[l]` (-1 where no token was run);
    router_indices[l]: [B, S, k], the router's own top-k (differs from `indices` only under replay);
    entropy[l]: [B, S] fp32, router entropy / log(E) per token, or None;
    logits[l]: [B*S, E] with autograd graph (only when recorded with keep_logits), or None;
    mask: [B, S] bool, tokens that count (attention mask and/or the caller's mask).
    """

    layers: list[int]
    indices: list[torch.Tensor]
    mask: torch.Tensor
    num_experts: int
    top_k: int
    router_indices: list[torch.Tensor] | None = None
    entropy: list[torch.Tensor] | None = None
    logits: list[torch.Tensor] | None = None
    families: list[RouterFamily] | None = None
    routers: list[torch.nn.Module] | None = None

    @classmethod
    def from_indices(cls, indices: Sequence[torch.Tensor], num_experts: int, *,
                     probs: Sequence[torch.Tensor] | None = None, mask: torch.Tensor | None = None) -> RoutingRecords:
        """Build records by hand: `indices[l]` is [N, k] or [B, S, k]; `probs[l]` (same leading shape, E
        last) gives the entropy; mask defaults to all tokens valid."""
        idx = [t if t.dim() == 3 else t.unsqueeze(0) for t in indices]
        ent = None
        if probs is not None:
            ent = [_normalized_entropy(p if p.dim() == 3 else p.unsqueeze(0)) for p in probs]
        if mask is None:
            mask = torch.ones(idx[0].shape[:2], dtype=torch.bool)
        mask = mask.reshape(idx[0].shape[:2]).bool()
        return cls(list(range(len(idx))), idx, mask, int(num_experts), int(idx[0].shape[-1]), entropy=ent)

    def select(self, rows: torch.Tensor | Sequence[int] | slice) -> RoutingRecords:
        """The records of a subset of the B sequences (e.g. one minibatch), in the given order."""
        if not isinstance(rows, slice):  # on the records' device once, not per layer (a host wait each)
            rows = to_device(torch.as_tensor(rows, dtype=torch.long), self.mask.device)

        def pick(ts: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if ts is None else [t[rows if isinstance(rows, slice) else rows.to(t.device)] for t in ts]

        return RoutingRecords(
            list(self.layers), pick(self.indices), self.mask[rows], self.num_experts, self.top_k,
            router_indices=pick(self.router_indices), entropy=pick(self.entropy), logits=None,
            families=self.families, routers=self.routers,
        )

    def valid_indices(self, layer_pos: int) -> torch.Tensor:
        """[n_valid, k] expert indices of the valid tokens at position `layer_pos` of `layers`."""
        return self.indices[layer_pos][self.mask]


def _normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    p = probs.float().clamp_min(1e-30)
    return -(p * p.log()).sum(-1) / math.log(probs.shape[-1])


class RoutingRecorder:
    """Context manager recording each router's choices during the forward passes run inside it.

    with RoutingRecorder(model) as rec:
        model(input_ids=ids, attention_mask=attn)          # one or several calls
    records = rec.records(mask=completion_mask)             # RoutingRecords, [B_total, S_max] layout

    The [B, S] layout and attention mask of each call are read from the model's input (a pre-hook on
    `model`); calls are stacked along B (right-padded with invalid tokens when S differs). `mask` (same
    [B, S] as the stacked inputs) further restricts which tokens count, e.g. completion tokens only.
    keep_logits=True keeps the router logits with their graph for `moe_aux_losses` (memory: B*S*E per
    layer); entropy=False skips the per-token entropy.
    """

    def __init__(self, model: torch.nn.Module, *, keep_logits: bool = False, entropy: bool = True,
                 routers: list[RouterInfo] | None = None) -> None:
        self.model = model
        self.routers = routers if routers is not None else find_routers(model)
        self.keep_logits = keep_logits
        self.want_entropy = entropy
        self._calls: list[dict[str, Any]] = []
        self._handle = None

    def __enter__(self) -> Self:
        self._handle = self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)
        for r in self.routers:
            _state(r).recorders.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for r in self.routers:
            st = _state(r)
            if self in st.recorders:
                st.recorders.remove(self)

    def _on_model_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        shape = tuple(ref.shape[:2]) if ref is not None else None
        attn = kwargs.get("attention_mask")
        if not (isinstance(attn, torch.Tensor) and attn.dim() == 2):
            attn = None
        self._calls.append({"shape": shape, "attn": attn, "layers": {}})

    def _capture(self, info: RouterInfo, logits: torch.Tensor, indices: torch.Tensor,
                 router_indices: torch.Tensor) -> None:
        if _in_backward():
            return  # activation-checkpointing recompute: the forward pass was already recorded
        if not self._calls or info.layer in self._calls[-1]["layers"]:
            # A router call without a model call (module run directly) or a second pass: new call record.
            self._calls.append({"shape": None, "attn": None, "layers": {}})
        entry: dict[str, torch.Tensor] = {"indices": indices.detach()}
        if router_indices is not indices:
            entry["router_indices"] = router_indices.detach()
        if self.want_entropy:
            with torch.no_grad():
                entry["entropy"] = _normalized_entropy(info.family.probs(info.module, logits.detach()))
        if self.keep_logits:
            entry["logits"] = logits
        self._calls[-1]["layers"][info.layer] = entry

    def records(self, mask: torch.Tensor | None = None) -> RoutingRecords:
        """The recorded routing as RoutingRecords (see its docstring for shapes)."""
        calls = [c for c in self._calls if c["layers"]]
        if not calls:
            raise RuntimeError("RoutingRecorder.records: no router ran inside the recorder context")
        layers = [r.layer for r in self.routers]
        k = self.routers[0].top_k
        shapes = []
        for c in calls:
            rows = next(iter(c["layers"].values()))["indices"].shape[0]
            shape = c["shape"] if c["shape"] is not None and c["shape"][0] * c["shape"][1] == rows else (1, rows)
            shapes.append(shape)
        s_max = max(s for _, s in shapes)

        def stack(key: str, fill: float, trailing: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
            out = []
            for lay in layers:
                parts = []
                for c, (b, s) in zip(calls, shapes):
                    entry = c["layers"][lay]
                    # Calls without replay have no separate router choice: it is the indices used.
                    t = entry["indices"] if key == "router_indices" and key not in entry else entry[key]
                    t = t.reshape(b, s, *trailing).to(dtype)
                    if s < s_max:
                        t = F.pad(t, (*([0, 0] * len(trailing)), 0, s_max - s), value=fill)
                    parts.append(t)
                out.append(torch.cat(parts, 0))
            return out

        indices = stack("indices", -1, (k,), torch.long)
        has_replay = any("router_indices" in e for c in calls for e in c["layers"].values())
        router_indices = stack("router_indices", -1, (k,), torch.long) if has_replay else None
        entropy = stack("entropy", 0.0, (), torch.float32) if self.want_entropy else None
        valid = []
        for c, (b, s) in zip(calls, shapes):
            v = torch.ones(b, s, dtype=torch.bool, device=indices[0].device)
            if c["attn"] is not None and tuple(c["attn"].shape) == (b, s):
                v = c["attn"].to(v.device).bool()
            valid.append(F.pad(v, (0, s_max - s), value=False))
        full_mask = torch.cat(valid, 0)
        if mask is not None:
            if tuple(mask.shape) != tuple(full_mask.shape):
                raise ValueError(
                    f"RoutingRecorder.records: mask shape {tuple(mask.shape)} != recorded layout "
                    f"{tuple(full_mask.shape)} (calls stacked along the batch dimension)"
                )
            full_mask = full_mask & mask.to(full_mask.device).bool()
        logits = None
        if self.keep_logits:
            if any(s != s_max for _, s in shapes):
                raise ValueError("RoutingRecorder.records: keep_logits needs every call to share one length")
            logits = [torch.cat([c["layers"][lay]["logits"] for c in calls], 0) for lay in layers]
        return RoutingRecords(
            layers, indices, full_mask, self.routers[0].num_experts, k, router_indices=router_indices,
            entropy=entropy, logits=logits, families=[r.family for r in self.routers],
            routers=[r.module for r in self.routers],
        )
