"""The rollout server process: a `VLLMColocateEngine` behind a stdlib HTTP server (the protocol, the transport
and why it is built this way: `gspo.rollout.vllm_server`, the client side).

    python -m gspo.rollout.server --model PATH --dtype float32 --max-model-len 512 --port 8000

`gspo serve CONFIG` runs `serve` with the values the config's rl stage would use.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gspo.rollout.base import SamplingSpec

logger = logging.getLogger(__name__)


class _Server:
    """The engine behind the HTTP endpoints; one request at a time (vLLM's LLM is not re-entrant)."""

    def __init__(self, engine: Any, info: dict[str, Any]) -> None:
        self.engine = engine
        self.info = {**info, "server_id": uuid.uuid4().hex, "weights_version": 0}
        self.lock = threading.Lock()

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = SamplingSpec(**{**body["sampling"], "stop_token_ids": tuple(body["sampling"]["stop_token_ids"])})
        with self.lock:
            batch = self.engine.generate(body["prompt_ids"], spec)
            version = self.info["weights_version"]
        rows = [ids[m.bool()].tolist() for ids, m in zip(batch.completion_ids, batch.mask, strict=True)]
        logps = None if batch.logp is None else [
            lp[m.bool()].tolist() for lp, m in zip(batch.logp, batch.mask, strict=True)]
        return {"completions": rows, "logps": logps, "finish_reasons": batch.finish_reasons,
                "texts": batch.completions, "weights_version": version}

    def update_weights(self, body: dict[str, Any]) -> dict[str, Any]:
        from safetensors.torch import load_file

        from gspo.rollout.weight_sync import reload_checkpoint_buckets

        folder = body["dir"]
        buckets = (load_file(os.path.join(folder, f)) for f in body["files"])  # read while vLLM reloads
        with self.lock:
            stats = reload_checkpoint_buckets(self.engine.llm, buckets)
            self.engine.llm.reset_prefix_cache()
            self.info["weights_version"] = int(body["version"])
        return {"seconds": stats.seconds, "bytes": stats.bytes, "tensors": stats.tensors, "buckets": stats.buckets,
                "weights_version": self.info["weights_version"]}


def _handler(server: _Server, stop: threading.Event) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """GET /health; POST /generate, /update_weights, /shutdown (JSON in, JSON out; errors as HTTP 500)."""

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per request is noise here
            logger.debug(fmt, *args)

        def _reply(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._reply(200, server.info)
            else:
                self._reply(404, {"error": f"no endpoint {self.path}"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            routes = {"/generate": server.generate, "/update_weights": server.update_weights}
            try:
                if self.path == "/shutdown":
                    self._reply(200, {"ok": True})
                    stop.set()
                    return
                if self.path not in routes:
                    self._reply(404, {"error": f"no endpoint {self.path}"})
                    return
                self._reply(200, routes[self.path](body))
            except Exception as e:  # the client turns it into one line; the server keeps serving
                logger.exception("rollout server: %s failed", self.path)
                self._reply(500, {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"})

    return Handler


def serve(model_path: str, tokenizer_path: str, *, dtype: str, seed: int, max_model_len: int,
          max_num_seqs: int | None = None, host: str = "127.0.0.1", port: int = 8000,
          kv_cache_memory_bytes: int | None = None, gpu_memory_utilization: float | None = None,
          enforce_eager: bool | None = None, ready_file: str | None = None) -> None:
    """Load the engine and serve until `/shutdown` (or the process is stopped). `ready_file`: written with the
    URL once the server listens (how `gspo train` knows a server it started is up)."""
    from transformers import AutoTokenizer

    from gspo.rollout.vllm_colocate import VLLMColocateEngine

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    engine = VLLMColocateEngine(model_path, tok, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                max_num_seqs=max_num_seqs, kv_cache_memory_bytes=kv_cache_memory_bytes,
                                gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)
    state = _Server(engine, {"model_path": model_path, "dtype": dtype, "max_model_len": max_model_len,
                             "pid": os.getpid()})
    stop = threading.Event()
    httpd = ThreadingHTTPServer((host, port), _handler(state, stop))
    url = f"http://{host}:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    logger.info("rollout server: %s serving %s (%s)", url, model_path, dtype)
    if ready_file:
        with open(ready_file + ".tmp", "w", encoding="utf-8") as f:
            f.write(url)
        os.replace(ready_file + ".tmp", ready_file)
    try:
        stop.wait()
    finally:
        httpd.shutdown()
        engine.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gspo.rollout.server", description="gspo's rollout server")
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--kv-cache-memory-bytes", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--enforce-eager", choices=["true", "false"])
    p.add_argument("--ready-file")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[gspo serve] %(message)s")
    serve(a.model, a.tokenizer or a.model, dtype=a.dtype, seed=a.seed, max_model_len=a.max_model_len,
          max_num_seqs=a.max_num_seqs, host=a.host, port=a.port, kv_cache_memory_bytes=a.kv_cache_memory_bytes,
          gpu_memory_utilization=a.gpu_memory_utilization, ready_file=a.ready_file,
          enforce_eager=None if a.enforce_eager is None else a.enforce_eager == "true")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
