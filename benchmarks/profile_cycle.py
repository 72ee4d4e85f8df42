"""Where a gspo + vLLM rollout cycle goes on one GPU: the benchmark's setting (benchmarks/gpu_gspo_vs_trl.py, a
4-layer Qwen3-30B-A3B cut, 8 prompts x 8 x 256 tokens, 4 minibatches), profiled in one process.

1. `--cycles` plain cycles (the first is warm-up): the trainer's own hop timings (`timing/*`), the reference.
2. One cycle under torch.profiler (CPU + CUDA): per hop (each `HopTimer` hop is a `gspo/<hop>` range), the GPU's
   busy fraction (union of kernel / copy intervals inside the hop's window), the kernels that took the most GPU
   time, the kernel / graph launches, and the host calls that waited for the GPU (cudaStreamSynchronize and
   friends: count and seconds).
3. One cycle under `torch.cuda.set_sync_debug_mode("warn")` (GPU): the host-device synchronisations per hop
   and per call site (SYNCS).
4. One cycle under cProfile: the Python functions that took the most host time (tottime), for the hops the GPU
   profile shows to be host-bound.
5. In the same process, right after the plain cycles (before any profiler), on the trainer's own engine: plain `LLM.generate` of the requests gspo's engine issues
   (seeded per prompt, logprobs=0 as flat lists, no detokenization), the same with per-token logprob dicts (what
   a plain call returns by default), without logprobs, with Python's garbage collector off, and gspo's
   `engine.generate` of them with and without logprobs: the rollout hop's floor measured next to the hop.
   Then PAIRED: `--paired` cycles, each rollout replayed right after its cycle, and again after a weight sync.
   The plain cycles' hops are printed apart for rollouts without and with the engine's logprobs (HOPS,
   HOPS_ENGINE_LOGPROBS; rollout.logp_gap_every).

    python benchmarks/profile_cycle.py --cycles 5 [gspo overrides]
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dataclasses
import gc
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmark's helpers

import gpu_gspo_vs_trl as bench

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length (s) of the union of [start, end] intervals given in microseconds."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e6


def split_trace(path: str, top: int) -> dict:
    """Per `gspo/<hop>` range of a chrome trace: wall, GPU busy, top kernels, host waits."""
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    hops = [(e["name"][5:], e["ts"], e["ts"] + e["dur"]) for e in events
            if e.get("cat") == "user_annotation" and e["name"].startswith("gspo/")]
    gpu = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") in GPU_CATS]
    runtime = [(e["ts"], e["dur"], e["name"]) for e in events if e.get("cat") == "cuda_runtime"]
    out = {}
    for hop, lo, hi in hops:
        inside = [(max(s, lo), min(e, hi), n) for s, e, n in gpu if e > lo and s < hi]
        by_kernel: dict[str, float] = collections.Counter()
        for s, e, n in inside:
            by_kernel[n[:90]] += (e - s) / 1e6
        waits = [(d, n) for ts, d, n in runtime if lo <= ts <= hi and ("Synchronize" in n or n in (
            "cudaMemcpy", "cudaMemcpyAsync") and d > 50)]
        launches = sum(1 for ts, _d, n in runtime if lo <= ts <= hi and "Launch" in n)
        wall = (hi - lo) / 1e6
        busy = union_seconds([(s, e) for s, e, _ in inside])
        out[hop] = {"wall_s": round(wall, 4), "gpu_busy_s": round(busy, 4),
                    "gpu_busy_frac": round(busy / wall, 3) if wall else 0.0, "kernels": len(inside), "launches": launches,
                    "host_waits": len(waits), "host_wait_s": round(sum(d for d, _ in waits) / 1e6, 4),
                    "top_kernels": [(n, round(s, 4)) for n, s in by_kernel.most_common(top)]}
    return out


def same_requests(trainer, rows: int, reps: int) -> dict:
    """LLM.generate of gspo's requests on the trainer's engine, next to engine.generate of the same prompts."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from gspo.rollout.base import derive_seed

    eng, spec = trainer.engine, trainer._sampling(10_000)
    ids = [trainer._prompt_ids(r) for r in trainer.dataset.rows[:rows]]
    eos = [trainer.tokenizer.eos_token_id]

    def params(logprobs, flat=True):
        return [SamplingParams(n=spec.n, temperature=spec.temperature, max_tokens=spec.max_new_tokens,
                               seed=derive_seed(spec.seed, b, spec.n), logprobs=logprobs, stop_token_ids=eos,
                               detokenize=False, flat_logprobs=flat) for b in range(len(ids))]

    variants = (("llm_generate", params(0), False), ("llm_generate_dict_logprobs", params(0, flat=False), False),
                ("llm_generate_no_logprobs", params(None), False), ("llm_generate_gc_off", params(0), True),
                ("llm_generate_no_logprobs_gc_off", params(None), True))
    times = collections.defaultdict(list)
    for _ in range(reps):
        for name, p, gc_off in variants:
            bench.sync()
            if gc_off:
                gc.disable()
            t = time.perf_counter()
            eng.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], p, use_tqdm=False)
            bench.sync()
            times[name].append(time.perf_counter() - t)
            gc.enable()
        for name, logprobs in (("engine_generate", True), ("engine_generate_no_logprobs", False)):
            t = time.perf_counter()
            eng.generate(ids, dataclasses.replace(spec, logprobs=logprobs))
            bench.sync()
            times[name].append(time.perf_counter() - t)
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def paired_rollouts(trainer, cycles: int) -> dict:
    """The rollout hop next to the same call made again right after the cycle (same prompts, same SamplingSpec),
    and once more after a weight sync of unchanged weights: one pair per cycle, so drift between calls (the
    same LLM.generate varies by +-20% over a minute on the H200) cancels. A replay as slow as the hop means
    the hop is the engine's generate; a fast replay means something about the cycle slows its rollout."""
    eng = trainer.engine
    calls = []
    real = eng.generate

    def recording(prompt_ids, sampling):
        calls.append((prompt_ids, sampling))
        return real(prompt_ids, sampling)

    eng.generate = recording
    out = collections.defaultdict(list)
    try:
        for _ in range(cycles):
            row = trainer.step()[-1]
            prompt_ids, sampling = calls[-1]
            out["hop"].append(row["timing/rollout"])
            for name in ("replay", "replay_after_sync"):
                if name == "replay_after_sync":
                    eng.update_weights(trainer._unwrapped())
                bench.sync()
                t = time.perf_counter()
                real(prompt_ids, sampling)
                bench.sync()
                out[name].append(time.perf_counter() - t)
    finally:
        eng.generate = real
    res = {k: [round(x, 4) for x in v] for k, v in out.items()}
    res["median"] = {k: round(statistics.median(v), 4) for k, v in out.items()}
    return res


SYNC_FRAMES = ("/gspo/", "/transformers/", "/vllm/", "/peft/", "/accelerate/")


def sync_sites(trainer, top: int) -> dict:
    """One cycle under `torch.cuda.set_sync_debug_mode("warn")`: every host-device synchronisation warns while
    its caller is on the stack. Counted per hop (the trainer method on the stack) and per call site (the
    innermost three frames of gspo / transformers / vLLM / peft / accelerate): the update's and π_old's syncs
    are where their GPU idles (the GPU profile's host waits)."""
    import traceback
    import warnings

    import torch

    hops = {"_update": "update", "_old_logprobs": "old_logprobs", "generate": "rollout", "update_weights":
            "weight_sync", "_reference": "ref_logprobs", "rollout_metrics": "moe_metrics"}
    by_site: collections.Counter = collections.Counter()
    by_hop: collections.Counter = collections.Counter()

    def note(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        stack = [f for f in traceback.extract_stack()[:-1] if any(k in f.filename for k in SYNC_FRAMES)]
        hop = next((hops[f.name] for f in stack if f.name in hops and "/gspo/" in f.filename), "other")
        by_hop[hop] += 1
        site = " <- ".join(f"{f.filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{f.lineno} {f.name}"
                           for f in reversed(stack[-3:]))
        by_site[f"[{hop}] {site or filename + ':' + str(lineno)}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"per_hop": dict(by_hop.most_common()), "sites": by_site.most_common(top * 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--paired", type=int, default=4, help="cycles with their rollout replayed (PAIRED)")
    ap.add_argument("--top", type=int, default=12, help="kernels / functions listed per hop")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "gspo-gpu-bench"))
    ap.add_argument("--trace", default=None, help="keep the chrome trace here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    os.makedirs(args.root, exist_ok=True)
    model_path = bench.build_model_dir(args.root, args.layers)
    from gspo.training.trainer import GSPOTrainer

    cfg = bench.gspo_config(args.root, model_path, "vllm_colocate", args.cycles + args.paired + 3, args.overrides)
    trainer = GSPOTrainer(cfg)
    rows = [trainer.step()[-1] for _ in range(args.cycles)]
    steady = rows[1:]
    for name, part in (("", [r for r in steady if "logp_gap/mean" not in r]),  # the default rollout
                       ("_ENGINE_LOGPROBS", [r for r in steady if "logp_gap/mean" in r])):  # a logp_gap rollout
        if part:
            hops = {k[7:]: round(statistics.median(r[k] for r in part), 4) for k in part[0] if k.startswith("timing/")}
            print(f"HOPS{name} " + json.dumps({"cycles": len(part), **hops}), flush=True)
    # Before any profiling: after torch.profiler has run in a process, its generate calls were measured slower.
    print("SAME_REQUESTS " + json.dumps(same_requests(trainer, bench.PROMPTS, 3)), flush=True)
    print("PAIRED " + json.dumps(paired_rollouts(trainer, args.paired)), flush=True)

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.CUDA else [])
    with profile(activities=acts) as prof:
        trainer.step()
    trace = args.trace or os.path.join(args.root, "cycle_trace.json")
    prof.export_chrome_trace(trace)
    for hop, info in split_trace(trace, args.top).items():
        print(f"GPU {hop} " + json.dumps(info), flush=True)

    if bench.CUDA:
        try:
            print("SYNCS " + json.dumps(sync_sites(trainer, args.top)), flush=True)
        except Exception as e:  # noqa: BLE001 (a diagnostic: the cProfile part still runs)
            print(f"SYNCS failed: {type(e).__name__}: {e}", flush=True)

    pr = cProfile.Profile()
    pr.enable()
    trainer.step()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.top * 3)
    print("CPROFILE (one cycle, tottime)\n" + s.getvalue()[-12000:], flush=True)


if __name__ == "__main__":
    main()
