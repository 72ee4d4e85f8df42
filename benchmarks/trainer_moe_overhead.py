"""Overhead of the MoE expert-health metrics + routing drift in the GSPO trainer, in % of step time.

Two trainers on the same tiny MoE and config, one with `moe.metrics=true` (the default) and one with
`moe.metrics=false`, stepped alternately in one process so both see the same machine load; reports the
median `timing/step` of each and the ratio. CPU by default (hf_generate engine; the vLLM engine is one per
process). On a GPU pass model/dtype overrides for a larger model.

    python benchmarks/trainer_moe_overhead.py [--rollouts 20] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollouts", type=int, default=20)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from gspo.config import load_config
    from gspo.training.trainer import GSPOTrainer

    base = os.path.join(tempfile.mkdtemp(prefix="gspo-bench-"), "run")
    common = ["model.name_or_path=tiny:qwen3_moe", "rollout.engine=hf_generate", "logging.progress=false",
              f"train.num_rollouts={args.rollouts}", "data.task_kwargs.digits=1", *args.overrides]
    recipe = os.path.join(REPO, "recipes", "tiny", "reasoning_rl.yaml")
    trainers = {
        flag: GSPOTrainer(load_config(recipe, [f"output_dir={base}-{flag}", f"moe.metrics={flag}", *common]))
        for flag in ("true", "false")
    }
    times: dict[str, list[float]] = {"true": [], "false": []}
    for i in range(args.rollouts):
        for flag in (("true", "false") if i % 2 == 0 else ("false", "true")):
            times[flag].append(trainers[flag].step()[-1]["timing/step"])
    warm = slice(2, None)  # first rollouts pay one-time costs
    on, off = statistics.median(times["true"][warm]), statistics.median(times["false"][warm])
    print(f"median step: metrics on {on * 1e3:.1f} ms, off {off * 1e3:.1f} ms, "
          f"overhead {100 * (on / off - 1):+.1f}% ({args.rollouts} rollouts each, interleaved)")


if __name__ == "__main__":
    main()
