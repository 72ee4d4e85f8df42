"""Rollouts colocated with the trainer vs on a vLLM server (rollout.engine=vllm_server), synchronous and
asynchronous (rollout.max_staleness=1).

Setting (as benchmarks/gpu_gspo_vs_trl.py): a Qwen3-30B-A3B-shaped MoE cut to 4 layers, random bf16 weights,
64 completions x 256 tokens per rollout (8 prompts x G=8), 4 optimizer steps per rollout. Runs, each in its own
process:

- colocate_1gpu: rollout.engine=vllm_colocate, trainer and engine on GPU 0.
- colocate_2gpu: the same launched on 2 GPUs (torchrun); needs the multi-process rl stage, and is reported as
                 failed where the rl stage refuses a multi-process launch.
- server_sync:   trainer on GPU 0, `python -m gspo.rollout.server` on GPU 1 (CUDA_VISIBLE_DEVICES=1),
                 rollout.server_url, max_staleness=0.
- server_async:  the same with rollout.max_staleness=1.

Per run: median cycle seconds (timing/step) over the cycles after the first two, the hops (rollout = the wait
for the rollout, update, weight_sync), weight-push seconds (sync/seconds), completion tokens/s per GPU, and the
idle fraction of each GPU (share of 50 ms samples of `torch.cuda.utilization` at 0; needs pynvml). The overlap
check: the async cycle must be within 10% of max(generation, training + weight push), both taken from the
synchronous server run of the same rollout (generation = its rollout hop; training = its cycle less its
rollout hop).

    python benchmarks/server_vs_colocate.py --cycles 8 --out server_bench.jsonl       # nvidia-h200-x2
    python benchmarks/server_vs_colocate.py --smoke --runs colocate_1gpu,server_sync,server_async --cycles 4  # CPU
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.environ.get("GSPO_BENCH_SMOKE") == "1"
CUDA = torch.cuda.is_available()
PROMPTS, G, MINIBATCHES = 8, 8, 4
NEW_TOKENS = 8 if SMOKE else 256
RUNS = ("colocate_1gpu", "colocate_2gpu", "server_sync", "server_async")


class Utilization:
    """Share of samples at 0% utilization per visible GPU (pynvml through torch), sampled every 50 ms."""

    def __init__(self) -> None:
        self.samples: dict[int, list[int]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while CUDA and not self._stop.is_set():
            for i in range(torch.cuda.device_count()):
                try:
                    self.samples.setdefault(i, []).append(int(torch.cuda.utilization(i)))
                except Exception:  # noqa: BLE001 (no pynvml: no idle numbers)
                    return
            time.sleep(0.05)

    def start(self) -> None:
        self._t.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._t.join()
        return {f"gpu{i}_idle_frac": round(sum(u == 0 for u in s) / len(s), 3) for i, s in self.samples.items() if s}


def write_inputs(root: str) -> tuple[str, str]:
    from gpu_gspo_vs_trl import prompts

    data = os.path.join(root, "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts())
    reward = os.path.join(root, "bench_rewards.py")
    with open(reward, "w") as f:
        f.write(textwrap.dedent("""
            import random
            def reward_len(prompts, completions, completion_ids, **kw):
                return [float(len(c)) / 1000.0 + random.random() for c in completions]
        """))
    return data, reward


def config(root: str, model_path: str, name: str, cycles: int, overrides: list[str]):
    from gspo.config import load_config

    data, reward = write_inputs(root)
    return load_config(None, [
        "stage=rl", f"output_dir={root}/run-{name}", "overwrite=true", f"model.name_or_path={model_path}",
        f"model.dtype={'float32' if SMOKE else 'bfloat16'}", f"data.path={data}", f"rollout.group_size={G}",
        f"rollout.prompts_per_step={PROMPTS}", f"rollout.max_new_tokens={NEW_TOKENS}", "algorithm.name=gspo",
        f"algorithm.num_minibatches={MINIBATCHES}", "optim.lr=1e-6", f"train.num_rollouts={cycles}",
        f"rewards=[{reward}:reward_len]", "logging.progress=false", *overrides])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: str, model_path: str, cfg) -> tuple[subprocess.Popen, str]:
    """The rollout server on the second GPU (CUDA_VISIBLE_DEVICES=1), as `gspo serve` would run it."""
    port = free_port()
    ready = os.path.join(root, f"server-{port}.url")
    dtype = cfg.rollout_dtype
    args = [sys.executable, "-m", "gspo.rollout.server", "--model", model_path, "--dtype", dtype,
            "--seed", str(cfg.seed), "--max-model-len", str(64 + 4 * NEW_TOKENS + 64), "--port", str(port),
            "--max-num-seqs", str(PROMPTS * G), "--ready-file", ready]
    if SMOKE:
        args += ["--kv-cache-memory-bytes", str(64 * 2**20)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="1") if CUDA else dict(os.environ)
    proc = subprocess.Popen(args, env=env, stdout=open(os.path.join(root, "server.log"), "w"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while not os.path.isfile(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server failed to start; see {root}/server.log")
        time.sleep(0.5)
    with open(ready) as f:
        return proc, f.read().strip()


def run(name: str, root: str, model_path: str, cycles: int, overrides: list[str]) -> dict:
    from gspo.training.trainer import GSPOTrainer

    proc = None
    extra: list[str] = []
    if name.startswith("server"):
        cfg0 = config(root, model_path, name, cycles, overrides)
        proc, url = start_server(root, model_path, cfg0)
        extra = ["rollout.engine=vllm_server", f"rollout.server_url={url}",
                 f"rollout.max_staleness={1 if name == 'server_async' else 0}"]
    else:
        extra = ["rollout.engine=vllm_colocate"]
    cfg = config(root, model_path, name, cycles, [*extra, *overrides])
    util = Utilization()
    try:
        trainer = GSPOTrainer(cfg)
        util.start()
        rows = []
        for _ in range(cycles):
            rows.append(trainer.step()[-1])
        idle = util.stop()
        trainer.engine.close()
        if getattr(trainer, "rollouts", None) is not None:
            trainer.rollouts.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    # Warm-up: the first two cycles; the last one of an async run has nothing to overlap with (no next rollout).
    steady = rows[2:] if len(rows) > 3 else rows[1:]
    if name == "server_async" and len(steady) > 1:
        steady = steady[:-1]
    keys = {k for r in steady for k in r if k.startswith(("timing/", "sync/"))}
    med = {k: statistics.median(r[k] for r in steady if k in r) for k in keys}
    tokens = statistics.median(r["completions/mean_length"] for r in steady) * PROMPTS * G
    n_gpus = 2 if name in ("server_sync", "server_async", "colocate_2gpu") else 1
    return {"cycle_s": round(med["timing/step"], 4), "rollout_s": round(med["timing/rollout"], 4),
            "update_s": round(med.get("timing/update", 0.0), 4), "weight_push_s": round(med.get("sync/seconds", 0.0), 4),
            "rollout_wait_s": round(med.get("timing/rollout_wait", 0.0), 4),
            "tokens_per_s_per_gpu": round(tokens / med["timing/step"] / n_gpus, 1),
            "staleness": [r.get("rollout/staleness") for r in rows], "cycles": [round(r["timing/step"], 3) for r in rows],
            **idle}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--cycles", type=int, default=8, help="rollout cycles per run; the first two are warm-up")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "gspo-server-bench"))
    ap.add_argument("--out", default=None, help="append one JSON line per run here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 8 tokens: a CPU check of the script")
    ap.add_argument("overrides", nargs="*", help="gspo config overrides for every run")
    args = ap.parse_args()
    if args.smoke and not SMOKE:
        os.environ["GSPO_BENCH_SMOKE"] = "1"
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    from gpu_gspo_vs_trl import build_model_dir

    os.makedirs(args.root, exist_ok=True)
    model_path = build_model_dir(args.root, args.layers)
    if args.child:
        print("RESULT " + json.dumps(run(args.child, args.root, model_path, args.cycles, args.overrides)), flush=True)
        return
    results = {}
    for name in args.runs.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--cycles", str(args.cycles), "--layers", str(args.layers),
               "--root", args.root, *args.overrides]
        env = dict(os.environ)
        if name == "colocate_2gpu":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *cmd[1:]]
        elif CUDA:
            env["CUDA_VISIBLE_DEVICES"] = "0" if name == "colocate_1gpu" else "0,1"
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            print(f"{name}: failed (rc {proc.returncode}): {err[-1] if err else ''}", flush=True)
            continue
        results[name] = {**json.loads(lines[-1][7:]), "wall_s": round(time.perf_counter() - t, 1)}
        print(name, json.dumps(results[name]), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"run": name, "smoke": SMOKE, **results[name]}) + "\n")
    device = torch.cuda.get_device_name(0) if CUDA else "CPU"
    print(f"\n{device}; {args.layers}-layer Qwen3-30B-A3B cut{' (smoke: tiny)' if SMOKE else ''}, {PROMPTS}x{G} "
          f"completions x <= {NEW_TOKENS} tokens, {MINIBATCHES} optimizer steps per cycle")
    print(f"{'run':<15}{'s/cycle':>9}{'rollout':>9}{'update':>9}{'push':>8}{'tok/s/GPU':>11}  idle")
    for name, r in results.items():
        idle = " ".join(f"{k[:4]}={v}" for k, v in r.items() if k.endswith("idle_frac"))
        print(f"{name:<15}{r['cycle_s']:>9.3f}{r['rollout_s']:>9.3f}{r['update_s']:>9.3f}{r['weight_push_s']:>8.3f}"
              f"{r['tokens_per_s_per_gpu']:>11.1f}  {idle}")
    if "server_sync" in results and "server_async" in results:
        s, a = results["server_sync"], results["server_async"]
        gen, train = s["rollout_s"], s["cycle_s"] - s["rollout_s"]
        bound = max(gen, train)
        print(f"overlap: async cycle {a['cycle_s']:.3f} s vs max(generation {gen:.3f}, training + push {train:.3f}) = "
              f"{bound:.3f} s -> {'within' if a['cycle_s'] <= 1.1 * bound else 'NOT within'} 10%; "
              f"async / sync = {a['cycle_s'] / s['cycle_s']:.2f}")


if __name__ == "__main__":
    main()
