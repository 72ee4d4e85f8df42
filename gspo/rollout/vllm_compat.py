"""Version-guarded shims for the differences between the supported vLLM releases (0.26 to 0.33) on the
weight-sync and sampling paths, and the supported-release check.

Each shim is guarded by a probe of what the installed vLLM does (its source, or a module it has), not by a
list of version strings, so the releases between those read (0.26.0, 0.32.0, 0.33.0; docs/rollout.md has the
API-by-API table) get the shim exactly when they have the code it works around. Where a probe cannot read the
source (a build without .py files) it falls back to the versions read. Each shim names the bug, the versions
and platforms it applies to, and is inert everywhere else. Imported only by the vLLM engine (never at gspo
import).

Seeded sampling with chunked prefill (0.26, 0.32, 0.33 on the CPU platform)
-------------------------------------------------------------------------
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
Probe: `seeded_prefill_rewinds` (the runner's `_bookkeeping_sync` calls `set_offset`).

Tokenizer-only folder (0.32, 0.33; not 0.26)
--------------------------------------------
vLLM's `get_tokenizer` (vllm/tokenizers/registry.py) first parses the tokenizer's folder as a model config
(`get_config(..., config_format="hf")`) and ignores the failure, but since 0.32 `get_config`
(vllm/transformers_utils/config.py) parses through `with_retry` (vllm/transformers_utils/repo_utils.py), which
has already logged the failure twice at ERROR level ("Error parsing config for ...: Unrecognized model") and
slept 2 s in between; 0.26 parses once and logs nothing. A `model.tokenizer` folder with tokenizer files only
(no config.json) always takes that path. `tokenizer_dir_for_vllm` hands vLLM a temporary folder of links to the
tokenizer's files plus the model's config.json instead, so the probe finds the model's config (which is the
config this tokenizer is used with); the engine removes the folder on close. Probe: `config_parse_retries`.

MoE re-pack after reload (0.32, 0.33 on the CPU platform; not 0.26)
-------------------------------------------------------------------
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
tensors into the kernel's storage. Measured: post-sync gap back to ~1e-6. In 0.26 the CPU backend does not go
through `_setup_kernel`: `process_weights_after_loading` builds a new `CPUFusedMOE` (which prepacks) on every
load, so there is nothing to re-run. Probe: `moe_prepack_skipped_on_update` (the prepack call in
`_setup_kernel` sits only under `if not is_weight_update`).

Reload messages (logger names differ: 0.26 against 0.32, 0.33)
--------------------------------------------------------------
`gspo.rollout.weight_sync` drops vLLM's "Following weights were not loaded from checkpoint" and "Failed to load
weights" lines during its reload and checks every parameter itself. The first is logged by
`GPUModelRunner.reload_weights` (logger vllm.v1.worker.gpu_model_runner) in 0.26, and by
`vllm.model_executor.model_loader.reload.inplace.reload_weights` (its own logger) in 0.32 and 0.33, where the
runner delegates to it; the second comes from the layerwise reloader in all three. `reload_logger_names`
names the loggers the installed vLLM uses, so the messages are handled the same way on every release.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import inspect
import logging
import textwrap
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

# The releases whose source was read for each shim; used only where a probe cannot read the installed source.
SEEDED_PREFILL_REWIND_READ = frozenset({"0.26.0", "0.32.0", "0.33.0"})
CONFIG_PARSE_RETRY_READ = frozenset({"0.32.0", "0.33.0"})
MOE_PREPACK_SKIPPED_READ = frozenset({"0.32.0", "0.33.0"})
_PATCH_FLAG = "_gspo_moe_repack_shim"
_INPLACE_RELOAD = "vllm.model_executor.model_loader.reload.inplace"  # 0.32+: reload_weights lives here
_RUNNER = "vllm.v1.worker.gpu_model_runner"  # 0.26: GPUModelRunner.reload_weights logs itself
_LAYERWISE = "vllm.model_executor.model_loader.reload.layerwise"


def _version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "?")).split("+")[0]


def _source(obj: Any) -> str | None:
    """The source of a vLLM function, or None where the build ships none."""
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        return None


# --------------------------------------------------------------------------------------------------- probes
def seeded_prefill_rewinds(bookkeeping: Any = None) -> bool:
    """Whether the V1 runner rewinds a discarded sample's seeded generator with `set_offset` (module docstring).
    `bookkeeping`: the function to read (default: the installed `GPUModelRunner._bookkeeping_sync`)."""
    if bookkeeping is None:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        bookkeeping = getattr(GPUModelRunner, "_bookkeeping_sync", None)
    src = _source(bookkeeping)
    return _version() in SEEDED_PREFILL_REWIND_READ if src is None else ".set_offset(" in src


def config_parse_retries(get_config: Any = None) -> bool:
    """Whether `get_config` parses through `with_retry`, which logs a failed parse at ERROR level (module
    docstring). `get_config`: the function to read (default: the installed one)."""
    if get_config is None:
        from vllm.transformers_utils.config import get_config
    src = _source(get_config)
    return _version() in CONFIG_PARSE_RETRY_READ if src is None else "with_retry(" in src


def moe_prepack_skipped_on_update(setup_kernel: Any = None) -> bool:
    """Whether `_setup_kernel` calls the experts' `process_weights_after_loading` only under
    `if not is_weight_update` (module docstring). `setup_kernel`: the function to read (default: the installed
    `UnquantizedFusedMoEMethod._setup_kernel`; `inspect.getsource` reads vLLM's own through the shim's wrapper)."""
    if setup_kernel is None:
        from vllm.model_executor.layers.fused_moe import unquantized_fused_moe_method as mod

        setup_kernel = mod.UnquantizedFusedMoEMethod._setup_kernel
    src = _source(setup_kernel)
    if src is None:
        return _version() in MOE_PREPACK_SKIPPED_READ
    guarded: set[int] = set()
    calls: list[ast.Call] = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.If) and _is_not_weight_update(node.test):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "process_weights_after_loading"):
            calls.append(node)
    return bool(calls) and all(id(c) in guarded for c in calls)


def _is_not_weight_update(test: ast.expr) -> bool:
    return (isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
            and isinstance(test.operand, ast.Name) and test.operand.id == "is_weight_update")


def reload_logger_names() -> tuple[str, str]:
    """(logger of "Following weights were not loaded", logger of "Failed to load weights") in the installed
    vLLM (module docstring)."""
    return (_INPLACE_RELOAD if importlib.util.find_spec(_INPLACE_RELOAD) is not None else _RUNNER), _LAYERWISE


# ---------------------------------------------------------------------------------------------------- shims
def tokenizer_dir_for_vllm(tokenizer_path: str, model_path: str) -> tuple[str, str | None]:
    """(the tokenizer path to give vLLM, a temporary folder the caller removes when done, or None).

    A local tokenizer folder without config.json gets a temporary stand-in (see the module docstring); any
    other path, or an unaffected vLLM, is returned as it is."""
    import os
    import tempfile

    model_config = os.path.join(model_path, "config.json")
    if (not os.path.isdir(tokenizer_path) or os.path.isfile(os.path.join(tokenizer_path, "config.json"))
            or not os.path.isfile(model_config) or not config_parse_retries()):
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

    if not current_platform.is_cpu() or not seeded_prefill_rewinds():
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
    if not moe_prepack_skipped_on_update():
        return False, f"vLLM {version}'s _setup_kernel does not skip the experts' prepack on a weight update"
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


# Model runner (vLLM 0.26-0.32 on GPU) ------------------------------------------------------------------------
# Up to 0.32 vLLM picks its V2 GPU model runner by default only for dense models and a short list of MoE
# architectures (vllm/config/vllm.py `DEFAULT_V2_MODEL_RUNNER_ARCHITECTURES`); from 0.33 V2 is the default for
# every model. The V1 runner samples seeded requests one by one on the host at every decoding step
# (`random_sample` in vllm/v1/sample/ops/topk_topp_sampler.py: one `exponential_(generator=...)` per request),
# and every gspo request is seeded; V2 draws each request's noise from (seed, position) inside one batched
# kernel (vllm/v1/worker/gpu/sample/gumbel.py), so the rollout's reproducibility costs nothing. Its weight
# reload is V1's `reload_weights` (vllm/v1/worker/gpu/model_runner.py), which `gspo.rollout.weight_sync` drives.
# V2's sampler asks at start-up whether FlashInfer's top-k/top-p sampler can run, which imports FlashInfer; it
# would never run for gspo's requests (V2 skips it for seeded requests and for processed logprobs, both always
# set: vllm/v1/worker/gpu/sample/sampler.py), so it is switched off and an install without FlashInfer works.
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
FLASHINFER_SAMPLER_ENV = "VLLM_USE_FLASHINFER_SAMPLER"


def use_v2_model_runner(*, on_gpu: bool, has_triton: bool | None = None) -> bool:
    """Ask vLLM for its V2 model runner on GPU (before the engine is built), unless the user's environment
    already chose (`VLLM_USE_V2_MODEL_RUNNER=0` keeps V1) or Triton is missing (V2 refuses to start without
    it). The CPU platform has one runner: nothing to do. Returns whether V2 was requested here."""
    import importlib.util
    import os

    if has_triton is None:
        has_triton = importlib.util.find_spec("triton") is not None
    if not on_gpu or not has_triton or os.environ.get(V2_RUNNER_ENV) is not None:
        return False
    os.environ[V2_RUNNER_ENV] = "1"
    os.environ.setdefault(FLASHINFER_SAMPLER_ENV, "0")
    logger.info("vllm: using the V2 GPU model runner (batched seeded sampling); %s=0 keeps V1", V2_RUNNER_ENV)
    return True


@contextlib.contextmanager
def keep_launch_process_group(keep: bool) -> Iterator[None]:
    """While an in-process vLLM engine shuts down, keep the default process group if it is not vLLM's.

    vLLM's engine-core shutdown ends in `cleanup_dist_env_and_memory()`, whose last step is
    `torch.distributed.destroy_process_group()` on the default group (vLLM 0.26 to 0.33). Under a multi-process
    launch that group is the launcher's (gspo's ranks, accelerate's state): destroying it breaks every later
    collective of the job (a pipeline's next barrier, the next stage). `keep`: the group existed before the
    engine was built. vLLM's own groups (`group` given) are destroyed as before. No vLLM API leaves the default
    group alone, hence this guard around the call, restored when it returns.
    """
    import torch.distributed as dist

    if not keep or not dist.is_available():
        yield
        return
    original = dist.destroy_process_group

    def destroy_unless_default(group: Any = None) -> None:
        if group is None or group is dist.group.WORLD:
            logger.debug("vLLM shutdown: the launcher's default process group is kept")
            return
        original(group)

    dist.destroy_process_group = destroy_unless_default
    try:
        yield
    finally:
        dist.destroy_process_group = original
