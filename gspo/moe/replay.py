"""R2 / R3 routing replay: force recorded experts in the forward passes run inside a `RoutingReplay`.

The router hooks of `gspo.moe.routing` ask the active replay for each layer's experts (`_RouterState.replay`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import torch

from gspo.moe.routing import RouterInfo, RoutingRecords, _in_backward, _state, find_routers


class RoutingReplay:
    """Context manager forcing recorded experts in the forward passes run inside it.

    `source`: RoutingRecords (e.g. π_old's, recorded in the trainer: R2; or built from the engine's routed
    experts: R3) or a list with one [B, S, k] index tensor per router layer. Each forward call inside the
    context consumes the next b sequences of the source, and its input must have the recorded length S:
    replay is by position in the [B, S] layout, so the trainer must feed the same padded layout it recorded
    (use `records.select(rows)` for a minibatch). Positions with index -1 keep the router's own choice.
    With activation checkpointing, call backward inside the context: the recompute reuses the experts its
    layer's last forward used.
    Combine weights are recomputed from the current logits at the forced experts, so gradients reach the
    router (GSPO paper §5.3: the router softmax still runs under replay).
    """

    def __init__(self, model: torch.nn.Module, source: RoutingRecords | Sequence[torch.Tensor],
                 routers: list[RouterInfo] | None = None) -> None:
        self.model = model
        self.routers = routers if routers is not None else find_routers(model)
        idx = source.indices if isinstance(source, RoutingRecords) else list(source)
        if len(idx) != len(self.routers):
            raise ValueError(f"RoutingReplay: source has {len(idx)} layers, model has {len(self.routers)} routers")
        for t, r in zip(idx, self.routers):
            if t.dim() != 3 or t.shape[-1] != r.top_k:
                raise ValueError(
                    f"RoutingReplay: layer {r.layer} indices must be [B, S, {r.top_k}], got {tuple(t.shape)}"
                )
        self.indices = {r.layer: t for r, t in zip(self.routers, idx)}
        self._cursor: dict[int, int] = {}
        self._last: dict[int, torch.Tensor] = {}
        self._shape: tuple[int, int] | None = None
        self._handle = None

    def __enter__(self) -> Self:
        for r in self.routers:
            st = _state(r)
            if st.replay is not None:
                raise RuntimeError(f"RoutingReplay: router {r.name} already has an active replay")
            st.replay = self
        self._handle = self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        for r in self.routers:
            st = _state(r)
            if st.replay is self:
                st.replay = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _on_model_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        self._shape = tuple(ref.shape[:2]) if ref is not None else None

    def _next(self, info: RouterInfo, rows: int, own: torch.Tensor) -> torch.Tensor:
        if _in_backward() and info.layer in self._last and self._last[info.layer].shape[0] == rows:
            # Activation-checkpointing recompute of this layer: force what its forward pass used.
            return self._last[info.layer]
        src = self.indices[info.layer]
        _, s_rec, k = src.shape
        b = rows // s_rec if rows % s_rec == 0 else -1
        if self._shape is not None and self._shape[0] * self._shape[1] == rows and self._shape[1] != s_rec:
            b = -1
        start = self._cursor.get(info.layer, 0)
        if b < 0 or start + b > src.shape[0]:
            raise ValueError(
                f"RoutingReplay: layer {info.layer} got {rows} tokens (input shape {self._shape}) but the "
                f"source layout is [B={src.shape[0]}, S={s_rec}] with {start} sequences used; replay needs the "
                f"recorded padded layout (same S, sequences in order)"
            )
        self._cursor[info.layer] = start + b
        forced = src[start:start + b].reshape(rows, k).to(own.device)
        # Unconditional where (no `.any()`): a host sync here would stall every MoE layer's forward on GPU.
        forced = torch.where(forced < 0, own.to(forced.dtype), forced)
        self._last[info.layer] = forced
        return forced
