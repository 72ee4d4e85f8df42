"""Does the tiny reasoning recipe still learn with asynchronous rollouts? recipes/tiny/reasoning_rl.yaml from its
cold start, synchronous (rollout.engine=vllm_colocate, as shipped) vs asynchronous (rollout.engine=vllm_server,
rollout.server_launch=true, rollout.max_staleness=1), over several seeds. Per run: mean reward of the first and
last `--window` rollouts and their difference, and the staleness the run logged. Too slow for CI (100 rollouts
per run); tests/test_trainer_server.py checks the asynchronous loop itself.

    python benchmarks/async_learning.py --seeds 0,1 --root /tmp/gspo-async-learning
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "tiny")
MODES = {"sync": ["rollout.engine=vllm_colocate"],
         "async": ["rollout.engine=vllm_server", "rollout.server_launch=true", "rollout.max_staleness=1"]}


def gspo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gspo", "train", *args, "logging.progress=false", "overwrite=true"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--modes", default="sync,async")
    ap.add_argument("--rollouts", type=int, default=100)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--root", default="/tmp/gspo-async-learning")
    ap.add_argument("--out", default=None, help="append one JSON line per run here")
    args = ap.parse_args()
    cold = os.path.join(args.root, "cold_start")
    if not os.path.isdir(os.path.join(cold, "final")):
        gspo(os.path.join(TINY, "cold_start.yaml"), f"output_dir={cold}")
    results = []
    for seed in args.seeds.split(","):
        for mode in args.modes.split(","):
            out = os.path.join(args.root, f"{mode}-seed{seed}")
            t = time.perf_counter()
            gspo(os.path.join(TINY, "reasoning_rl.yaml"), f"output_dir={out}", f"seed={seed}",
                 f"model.name_or_path={cold}/final", f"train.num_rollouts={args.rollouts}", *MODES[mode])
            with open(os.path.join(out, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            per = {}
            for r in rows:
                per[r["rollout"]] = r
            rewards = [per[k]["reward"] for k in sorted(per)]
            first = sum(rewards[: args.window]) / args.window
            last = sum(rewards[-args.window:]) / args.window
            res = {"mode": mode, "seed": int(seed), "first": round(first, 4), "last": round(last, 4),
                   "rise": round(last - first, 4), "staleness": sorted({per[k].get("rollout/staleness") for k in per}),
                   "s_per_rollout": round(sum(per[k]["timing/step"] for k in per) / len(per), 3),
                   "wall_s": round(time.perf_counter() - t, 1)}
            results.append(res)
            print(json.dumps(res), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(res) + "\n")
    print(f"\n{'mode':<7}{'seed':>5}{'first':>8}{'last':>8}{'rise':>8}{'s/rollout':>11}")
    for r in results:
        print(f"{r['mode']:<7}{r['seed']:>5}{r['first']:>8.3f}{r['last']:>8.3f}{r['rise']:>8.3f}{r['s_per_rollout']:>11.3f}")


if __name__ == "__main__":
    main()
