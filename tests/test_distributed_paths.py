"""Options of the rl stage on two real processes (torchrun, gloo on CPU, FSDP2) against one process, beyond the
default path of test_distributed_rl.py: the KL term (a sharded reference model; LoRA's adapter-disabled
reference), R2 routing replay, π_old from the engine, periodic evaluation, trackers; and a failure on one rank
only, which must stop every rank at once with its one-line error."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPO
from test_distributed_rl import (
    LAUNCH_VARS,
    _check,
    _write_config,
    assert_same_weights,
    final_weights,
    metrics,
    run_gspo,
    start_weights,
)

from gspo.models.loading import build_tiny_model


@pytest.mark.timeout(600)
def test_kl_reference_and_r2_replay_on_two_processes_equal_one(tmp_path):
    """algorithm.beta > 0 (a second model, sharded like the policy, gives the reference log-probs of each
    rank's rows) with R2 replay of π_old's experts (records gathered over the ranks, replayed for each rank's
    rows of a minibatch) under token-level GRPO: every logged number and the final weights match one process."""
    model = build_tiny_model("qwen3_moe", tmp_path / "model")
    config = _write_config(tmp_path, model, engine="hf_generate", loss="grpo", rollouts=2)
    opts = ("algorithm.beta=0.1", "moe.routing_replay=r2")
    r2 = run_gspo(config, tmp_path / "two", 2, *opts)
    r1 = run_gspo(config, tmp_path / "one", 1, *opts)
    one = _check(tmp_path / "one", tmp_path / "two", r1, r2)
    # The KL term and the replay were in effect (and so compared): a non-zero KL once the policy moved, the
    # experts used never drift from π_old's under replay while the router's own choice is measured.
    assert any(r["kl"] > 0 for r in one)
    assert all(r["moe/routing_drift"] == 0 for r in one) and "moe/router_drift" in one[0]
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), start_weights(model))


@pytest.mark.timeout(600)
def test_lora_kl_reference_on_two_processes_equal_one(tmp_path):
    """A LoRA policy's KL reference is the policy with its adapters disabled (no second model); on two processes
    the sharded peft model serves it."""
    model = build_tiny_model("qwen3_moe", tmp_path / "model")
    config = _write_config(tmp_path, model, engine="hf_generate", rollouts=2)
    opts = ("lora.enabled=true", "optim.lr=3.0e-3", "algorithm.beta=0.1")
    r2 = run_gspo(config, tmp_path / "two", 2, *opts)
    r1 = run_gspo(config, tmp_path / "one", 1, *opts)
    one = _check(tmp_path / "one", tmp_path / "two", r1, r2)
    assert any(r["kl"] > 0 for r in one)
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), start_weights(model),
                        moved_frac=0.1)


@pytest.mark.timeout(600)
def test_engine_old_logp_and_periodic_eval_on_two_processes_equal_one(tmp_path):
    """rollout.old_logp_source=engine with the MoE metrics off (so no trainer π_old pass runs at all: the ratio's
    denominator is the gathered sampler log-probs), train.eval_every=2 (every rank's engine samples the
    evaluation, rank 0 logs it), samples every rollout: the same rows, eval/* and samples as one process, each
    written once."""
    model = build_tiny_model("qwen3_moe", tmp_path / "model")
    config = _write_config(tmp_path, model, engine="hf_generate", rollouts=4)
    opts = ("rollout.old_logp_source=engine", "moe.metrics=false", "train.eval_every=2", "eval.num_prompts=4",
            "eval.num_samples=2", "eval.k=[1,2]", "logging.sample_every=1", "logging.num_samples=3")
    r2 = run_gspo(config, tmp_path / "two", 2, *opts)
    r1 = run_gspo(config, tmp_path / "one", 1, *opts)
    one = _check(tmp_path / "one", tmp_path / "two", r1, r2)
    assert "logp_gap/mean" not in one[0]  # no trainer pass: nothing to compare the engine's log-probs with
    evals = {r["rollout"]: r["eval/pass@1"] for r in one if "eval/pass@1" in r}
    assert sorted(evals) == [2, 4]
    assert [r["step"] for r in metrics(tmp_path / "two")] == list(range(1, 33))

    def samples(out):
        with open(os.path.join(out, "samples.jsonl"), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    s1, s2 = samples(tmp_path / "one"), samples(tmp_path / "two")
    assert [s["rollout"] for s in s2] == [r for r in range(1, 5) for _ in range(3)]
    assert [(s["completion"], s["reward"]) for s in s1] == [(s["completion"], s["reward"]) for s in s2]


def test_tracker_config_is_flat_with_scalar_values():
    """What TensorBoard's hparams take (it refused the nested config, so `logging.trackers: [tensorboard]` failed
    at the start of any rl run); checked without TensorBoard installed."""
    from gspo.config import Config
    from gspo.training.metrics_log import tracker_config

    flat = tracker_config(Config().to_dict())
    assert flat["rollout.group_size"] == Config().rollout.group_size and "algorithm.beta" in flat
    assert all(type(v) in (bool, int, float, str) for v in flat.values()), \
        {k: v for k, v in flat.items() if type(v) not in (bool, int, float, str)}


@pytest.mark.timeout(300)
def test_tracker_written_once_on_two_processes(tmp_path):
    """logging.trackers on two processes: one TensorBoard writer (rank 0), one scalar per optimizer step, and the
    run's config as flat hyperparameters (TensorBoard refuses nested sections)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = build_tiny_model("qwen3_moe", tmp_path / "model")
    config = _write_config(tmp_path, model, engine="hf_generate", rollouts=2)
    out = tmp_path / "two"
    r = run_gspo(config, out, 2, "logging.trackers=[tensorboard]")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    files = glob.glob(str(out / "gspo" / "events.out.tfevents.*"))
    assert len(files) == 1, files  # written by one process
    acc = EventAccumulator(files[0])
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 17))
    assert [e.value for e in acc.Scalars("reward")] == pytest.approx([r["reward"] for r in metrics(out)])


REWARD_FAILS_ON_ONE_RANK = '''
import os

def token_mix(prompts, completions, completion_ids, trainer_state=None, **_):
    # trainer_state: given by the training step, not by the periodic evaluation
    if os.environ["RANK"] == "{rank}" and (trainer_state is None) == {in_eval}:
        raise ValueError("the grader is unreachable from this host")
    return [(sum(ids) % 5) / 4.0 for ids in completion_ids]
'''


def _two_ranks_directly(tmp_path, config: str, *overrides: str) -> list[tuple[int, str]]:
    """`gspo train` as ranks 0 and 1 of a two-process launch started directly (as mpirun would, with no launcher
    watching to kill a survivor): each one's exit status and stderr. Asserts both ended within 180 s."""
    import socket

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MASTER_ADDR="127.0.0.1")
    for v in LAUNCH_VARS:
        env.pop(v, None)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    logs = [tmp_path / f"rank{r}.err" for r in (0, 1)]
    start = time.monotonic()
    procs = []
    for r in (0, 1):
        with open(logs[r], "w") as err:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gspo", "train", config, f"output_dir={tmp_path / 'out'}", *overrides],
                cwd=REPO, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2"),
                stdout=subprocess.DEVNULL, stderr=err))
    try:
        for p in procs:
            p.wait(timeout=240)
    finally:
        for p in procs:
            p.kill()
    # Stopped at the failure, not at a timeout: the time is that of loading and a rollout or two.
    assert time.monotonic() - start < 180
    return [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]


def _assert_stopped_together(results, failing: int, what: str) -> None:
    errors = []
    for rc, stderr in results:
        assert rc == 1, (rc, stderr[-3000:])
        assert "Traceback" not in stderr, stderr[-3000:]
        errors.append([line for line in stderr.splitlines() if line.startswith("error:")])
    own = "reward function 'token_mix' raised ValueError: the grader is unreachable from this host"
    assert len(errors[failing]) == 1 and errors[failing][0].startswith(f"error: {own}"), errors
    if failing == 1:
        assert len(errors[0]) == 1 and errors[0][0].startswith(f"error: {what} failed on rank 1 of 2: {own}"), \
            errors
    else:
        assert errors[1] == [], errors


@pytest.mark.timeout(300)
@pytest.mark.parametrize("failing", [1, 0])
def test_reward_failing_on_one_rank_stops_every_rank_with_its_error(tmp_path, failing):
    """A reward that raises on one rank only: both processes stop at once (well under gloo's 30-minute timeout)
    with status 1 and no traceback; the failing rank prints its own `error:` line, rank 0 (when it is not the
    one) a line naming the failing rank and its error, any other rank nothing."""
    model = build_tiny_model("qwen3_moe", tmp_path / "model")
    config = _write_config(tmp_path, model, engine="hf_generate", rollouts=2)
    (tmp_path / "reward.py").write_text(REWARD_FAILS_ON_ONE_RANK.format(rank=failing, in_eval=False))
    _assert_stopped_together(_two_ranks_directly(tmp_path, config), failing, "the rewards")
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # no step was logged past the failure


@pytest.mark.timeout(300)
def test_evaluation_reward_failing_on_one_rank_stops_every_rank(tmp_path):
    """The same for the periodic evaluation's rewards (every rank samples and scores the evaluation prompts): the
    failure at the first evaluation stops both before the next chunk's sampling."""
    model = build_tiny_model("qwen3_moe", tmp_path / "model")
    config = _write_config(tmp_path, model, engine="hf_generate", rollouts=2)
    (tmp_path / "reward.py").write_text(REWARD_FAILS_ON_ONE_RANK.format(rank=1, in_eval=True))
    results = _two_ranks_directly(tmp_path, config, "train.eval_every=1", "eval.num_prompts=4",
                                  "rollout.prompts_per_step=2", "eval.num_samples=2", "eval.k=[1]")
    _assert_stopped_together(results, 1, "the evaluation's rewards")
