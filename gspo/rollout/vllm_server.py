"""vLLM in its own process (`rollout.engine=vllm_server`): a small HTTP server around the colocated engine, and
the trainer-side client engine that talks to it (docs/rollout.md, "vllm_server and asynchronous rollouts").

The server (`gspo serve CONFIG`, or started by `gspo train` with `rollout.server_launch=true`; in
`gspo.rollout.server`) holds a `VLLMColocateEngine` and answers `GET /health` (server id, new at every start;
weights version), `POST /generate` (the colocated engine's code and per-prompt seeds, so a synchronous run
reproduces its rollouts), `POST /update_weights` (a folder of per-layer safetensors buckets on the same host,
/dev/shm where it exists, reloaded through `weight_sync.reload_checkpoint_buckets`; a stale parameter is an
HTTP 500) and `POST /shutdown`. Why not TRL's `trl vllm-serve` / `VLLMClient`: every weight-transfer backend
of vLLM 0.32 needs CUDA, the transfer bypasses the reload's post-load processing (the MoE re-pack shim, the
stale-weight check), and its generate takes no seed.

Failures. Every request has `rollout.server_timeout` seconds; a refused connection, a timeout, a dead process or
an error answer raise `RolloutServerError` with one line (URL, what failed, what to do). A server that restarted
(a new server id, or a weights version behind the trainer's) gets the trainer's current weights before it
generates.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from gspo.registry import ROLLOUT_ENGINES
from gspo.rollout.base import EngineInputs, RolloutBatch, SamplingSpec, assemble_batch

logger = logging.getLogger(__name__)


class RolloutServerError(RuntimeError):
    """The rollout server failed, hung or could not be reached (the message is one line saying what to do)."""


def serve_args(run: EngineInputs, section: Any, *, host: str = "127.0.0.1", port: int = 0) -> list[str]:
    """The command line of a server for this run (what `gspo train` starts with `rollout.server_launch`)."""
    tokenizer = getattr(run.tokenizer, "name_or_path", None) or run.model_path
    args = [sys.executable, "-m", "gspo.rollout.server", "--model", run.model_path, "--tokenizer", tokenizer,
            "--dtype", run.dtype, "--seed", str(run.seed), "--max-model-len", str(run.max_model_len),
            "--host", host, "--port", str(port)]
    if run.max_num_seqs is not None:
        args += ["--max-num-seqs", str(run.max_num_seqs)]
    if section.kv_cache_memory_bytes is not None:
        args += ["--kv-cache-memory-bytes", str(section.kv_cache_memory_bytes)]
    if section.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(section.gpu_memory_utilization)]
    if section.enforce_eager is not None:
        args += ["--enforce-eager", str(section.enforce_eager).lower()]
    return args


# ================================================================================================== client side
def _transfer_root() -> str | None:
    """Where weight buckets go: /dev/shm (memory) where it exists, else the system's temp folder."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class VLLMServerEngine:
    """Trainer-side engine talking to a rollout server (module docstring). Owns the server process only when it
    started it (`launch=True`); `close()` stops only that process."""

    def __init__(self, url: str | None, tokenizer: Any, *, timeout: float, model: torch.nn.Module | None = None,
                 launch_args: list[str] | None = None, start_timeout: float = 600.0,
                 dtype: str | None = None, max_model_len: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.timeout = float(timeout)
        self.model = model  # re-pushed to a restarted server
        self.version = 0  # weight updates pushed so far (0 = the checkpoint the server loaded)
        self.proc: subprocess.Popen | None = None
        self._ready_dir: str | None = None
        self.last_sync_stats: Any = None
        self.last_sync_seconds: float | None = None
        self.last_push: dict[str, float] = {}
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.launch_args = launch_args
        if launch_args is not None:
            url = self._launch(launch_args, start_timeout)
        assert url is not None
        self.url = url.rstrip("/")
        info = self._request("GET", "/health", None, what="connect")
        # The id of a server known to hold this run's weights: one this engine started loaded the run's model;
        # an attached one gets the weights pushed before it first generates (it may hold anything).
        self.server_id = info["server_id"] if launch_args is not None else None
        if dtype is not None and info.get("dtype") != dtype:
            raise RolloutServerError(f"rollout server {self.url} runs dtype {info.get('dtype')}, the run needs "
                                     f"{dtype}: restart it with the run's config (`gspo serve CONFIG`)")
        if max_model_len is not None and int(info.get("max_model_len", 0)) < max_model_len:
            raise RolloutServerError(f"rollout server {self.url} has max_model_len {info.get('max_model_len')}, the "
                                     f"run needs {max_model_len}: restart it with rollout.max_model_len="
                                     f"{max_model_len}")

    # ------------------------------------------------------------------------------------------------ process
    def _launch(self, args: list[str], start_timeout: float) -> str:
        self._ready_dir = tempfile.mkdtemp(prefix="gspo-server-")
        ready = os.path.join(self._ready_dir, "url")
        log_path = os.path.join(self._ready_dir, "server.log")
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (kept open while the server runs)
        self.proc = subprocess.Popen([*args, "--ready-file", ready], stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if os.path.isfile(ready):
                with open(ready, encoding="utf-8") as f:
                    return f.read().strip()
            if self.proc.poll() is not None:
                tail = _tail(log_path)
                raise RolloutServerError(f"rollout server exited with code {self.proc.returncode} while starting "
                                         f"({tail}); its log: {log_path}")
            time.sleep(0.2)
        raise RolloutServerError(f"rollout server did not start within {start_timeout:g} s "
                                 f"(rollout.server_start_timeout); its log: {log_path}")

    # ------------------------------------------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, body: dict[str, Any] | None, *, what: str) -> dict[str, Any]:
        url = getattr(self, "url", None) or ""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        hint = ("restart it (`gspo serve CONFIG`, or rollout.server_launch=true) and resume with "
                "resume_from=latest")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("error", "")
            except Exception:  # noqa: BLE001 (a non-JSON error page)
                detail = str(e)
            raise RolloutServerError(f"rollout server {url}: {what} failed on the server ({detail})") from None
        except TimeoutError:
            raise RolloutServerError(f"rollout server {url}: {what} timed out after {self.timeout:g} s "
                                     f"(rollout.server_timeout); the server hangs or is overloaded: {hint}") from None
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            dead = self.proc is not None and self.proc.poll() is not None
            state = f"the server process exited with code {self.proc.returncode}" if dead else "unreachable"
            raise RolloutServerError(f"rollout server {url}: {what} failed, {state} ({reason}); {hint}") from None

    # -------------------------------------------------------------------------------------------- sampling
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSpec) -> RolloutBatch:
        self._ensure_current_weights()
        body = {"prompt_ids": [list(map(int, p)) for p in prompt_ids],
                "sampling": {**sampling.__dict__, "stop_token_ids": list(sampling.stop_token_ids)}}
        out = self._request("POST", "/generate", body, what="generate")
        return assemble_batch(prompt_ids, out["completions"], out["logps"], out["finish_reasons"], out["texts"],
                              group_size=sampling.n, pad_token_id=self.pad_token_id,
                              weights_version=out["weights_version"])

    def _ensure_current_weights(self) -> None:
        """A restarted server (new id) or one behind the trainer gets the current weights first."""
        info = self._request("GET", "/health", None, what="health check")
        if info["server_id"] == self.server_id and int(info["weights_version"]) == self.version:
            return
        if self.model is None:
            raise RolloutServerError(f"rollout server {self.url} does not hold this run's weights and the engine "
                                     "has no model to push (EngineInputs.model)")
        if threading.current_thread() is not threading.main_thread():
            # Generating ahead (max_staleness=1) while the trainer updates the model in place: the weights this
            # rollout needs are gone and the module is mid-update, so nothing consistent can be pushed.
            raise RolloutServerError(f"rollout server {self.url} restarted while generating the next rollout "
                                     "ahead; resume the run with resume_from=latest")
        if self.server_id is not None:
            logger.warning("rollout server %s restarted (weights version %s, trainer at %d): pushing the current "
                           "weights before it generates", self.url, info["weights_version"], self.version)
        self._push(self.model, self.version)
        self.server_id = info["server_id"]

    # ----------------------------------------------------------------------------------------- weight sync
    def update_weights(self, model: torch.nn.Module) -> None:
        self.model = model
        self._push(model, self.version + 1)
        self.version += 1

    def _push(self, model: torch.nn.Module, version: int) -> None:
        """Write the checkpoint-format buckets (layer order) and have the server reload them (module docstring)."""
        from safetensors.torch import save_file

        from gspo.rollout.weight_sync import SyncStats, checkpoint_buckets

        start = time.perf_counter()
        folder = tempfile.mkdtemp(prefix="gspo-weights-", dir=_transfer_root())
        try:
            files = []
            for i, bucket in enumerate(checkpoint_buckets(model)):
                name = f"{i:05d}.safetensors"
                # clone: converted tensors may share storage, which safetensors refuses to write
                save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in bucket.items()},
                          os.path.join(folder, name))
                files.append(name)
            written = time.perf_counter() - start
            out = self._request("POST", "/update_weights", {"dir": folder, "files": files, "version": version},
                                what="weight update")
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # only the folder this call made
        if int(out["weights_version"]) != version:
            raise RolloutServerError(f"rollout server {self.url}: weight update to version {version} reported "
                                     f"version {out['weights_version']}")
        total = time.perf_counter() - start
        self.last_sync_stats = SyncStats(seconds=total, bytes=int(out["bytes"]), tensors=int(out["tensors"]),
                                         buckets=int(out["buckets"]), path="server")
        self.last_sync_seconds = total
        self.last_push = {"sync/write_seconds": written, "sync/server_reload_seconds": float(out["seconds"])}

    # ----------------------------------------------------------------------------------------------- rest
    def sleep(self) -> None:  # the server has its own device: nothing to release on the trainer's
        pass

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        """Stop the server this engine started (by its pid); an attached server keeps running."""
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            try:
                self._request("POST", "/shutdown", {}, what="shutdown")
                proc.wait(timeout=60)
            except (RolloutServerError, subprocess.TimeoutExpired):
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.proc = None
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._ready_dir:
            shutil.rmtree(self._ready_dir, ignore_errors=True)
            self._ready_dir = None


def _tail(path: str, n: int = 1) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return " | ".join(lines[-n:]) or "no output"
    except OSError:
        return "no log"


@ROLLOUT_ENGINES.register("vllm_server")
def build_vllm_server(section: Any, run: EngineInputs) -> VLLMServerEngine:
    """Engine builder: attach to `rollout.server_url`, or start a server on this host with
    `rollout.server_launch=true` (stopped by `close()`)."""
    if section.server_url is None and not section.server_launch:
        raise RolloutServerError("rollout.engine=vllm_server needs rollout.server_url (a running `gspo serve "
                                 "CONFIG`) or rollout.server_launch=true")
    launch = serve_args(run, section, port=section.server_port) if section.server_url is None else None
    return VLLMServerEngine(section.server_url, run.tokenizer, timeout=section.server_timeout, model=run.model,
                            launch_args=launch, start_timeout=section.server_start_timeout, dtype=run.dtype,
                            max_model_len=run.max_model_len)

