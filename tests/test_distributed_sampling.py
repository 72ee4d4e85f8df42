"""The stages that only sample and score (rejection_sampling, `gspo eval`) on two real processes (torchrun, gloo
on CPU, one vLLM engine per process) against one process: each process scores its own share of the prompts
(every prompt once), and the files rank 0 writes are the one-process run's, row for row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO
from test_distributed_rl import LAUNCH_VARS

# A reward with spread on an untrained model (a deterministic function of the completion's tokens) that also
# notes which process scored which prompt (one line per completion).
REWARD = '''
import os


def token_mix(prompts, completions, completion_ids, **_):
    with open(os.path.join(os.environ["SCORED_DIR"], "rank-" + os.environ.get("RANK", "0")), "a") as f:
        f.writelines(p + "\\n" for p in prompts)
    return [(sum(ids) % 5) / 4.0 for ids in completion_ids]
'''

# 13 prompts in engine calls of 5: the calls split 3 + 2, 3 + 2 and 2 + 1 over two processes.
COMMON = """
seed: 0
model: {name_or_path: "tiny:qwen3_moe", dtype: float32}
rollout: {engine: vllm_colocate, group_size: 4, prompts_per_step: 5, max_new_tokens: 8, temperature: 1.0,
          kv_cache_memory_bytes: 67108864}
logging: {progress: false}
"""

REJECTION = COMMON + """
stage: rejection_sampling
data: {task: add, num_samples: 13, chat_template: always, task_kwargs: {digits: 1}, shuffle: false}
rejection: {min_reward: 0.5, best_of: 2, dedup: true, drop_truncated: false, mix_task: add,
            mix_task_kwargs: {digits: 1}, mix_ratio: 0.5}
rewards: [{fn: reward.py:token_mix}]
"""

EVAL = COMMON + """
stage: rl
data: {task: add, num_samples: 64, chat_template: always, task_kwargs: {digits: 1}}
eval: {num_samples: 4, k: [1, 4], num_prompts: 13, pass_threshold: 1.0}
rewards: [{fn: reward.py:token_mix}, synthetic_format]
"""


def _run(tmp_path, command: str, text: str, name: str, processes: int) -> tuple[str, list[list[str]], str]:
    """`gspo <command>` of the config `text` on `processes` processes (torchrun for more than one), one thread
    each, into tmp_path/name; returns the output folder, the prompts each rank scored and the output."""
    (tmp_path / "reward.py").write_text(REWARD)
    config = tmp_path / f"{command}.yaml"
    config.write_text(text)
    out, scored = tmp_path / name, tmp_path / f"{name}-scored"
    scored.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", SCORED_DIR=str(scored))
    for v in LAUNCH_VARS:
        env.pop(v, None)
    launch = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node",
              str(processes), "-m"] if processes > 1 else [sys.executable, "-m"]
    # Its own session: a launch that hangs (a rank left waiting in a collective) is killed whole, workers too,
    # before the test's own time limit.
    proc = subprocess.Popen([*launch, "gspo", command, str(config), f"output_dir={out}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _kill_workers(f"output_dir={out}")  # torchrun's workers leave its process group
        stdout, stderr = proc.communicate()
        pytest.fail(f"gspo {command} on {processes} process(es) hung: {(stdout + stderr)[-3000:]}")
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ranks = [(scored / f"rank-{i}").read_text().splitlines() if (scored / f"rank-{i}").exists() else []
             for i in range(processes)]
    return str(out), ranks, r.stdout


def _kill_workers(marker: str) -> None:
    """SIGKILL every process whose command line contains `marker` (this test's own output folder)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def _json(path: str, *drop: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if k not in drop}


def _check_shares(one: list[list[str]], two: list[list[str]]) -> None:
    """Every completion scored once, by one of the two processes, each scoring its share (none idle)."""
    assert all(two), [len(r) for r in two]
    assert sorted(two[0] + two[1]) == sorted(one[0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("engine", ["vllm_colocate", "hf_generate"])
def test_rejection_sampling_on_two_processes_writes_the_one_process_files(tmp_path, engine):
    """hf_generate: one call per prompt (`hf_batch_prompts: 1`, the seeds of a lone prompt), so the ranks make
    different numbers of calls (8 and 5): each generates on its own (no `synced_gpus` for an unsharded model)."""
    config = REJECTION.replace("engine: vllm_colocate,", f"engine: {engine}, hf_batch_prompts: 1,")
    one, scored1, _ = _run(tmp_path, "train", config, "one", 1)
    two, scored2, _ = _run(tmp_path, "train", config, "two", 2)
    _check_shares(scored1, scored2)
    with open(os.path.join(one, "data.jsonl"), encoding="utf-8") as a, \
            open(os.path.join(two, "data.jsonl"), encoding="utf-8") as b:
        rows1, rows2 = a.read(), b.read()
    assert rows2 == rows1  # the same rows in the same order, each once
    sources = [json.loads(line)["source"] for line in rows1.splitlines()]
    assert "rejection_sampling" in sources and "mix" in sources  # something was kept, and mixed in
    # The same statistics; `model` names each run's own tiny model (built into its output_dir by rank 0).
    stats1, stats2 = _json(os.path.join(one, "stats.json"), "model"), _json(os.path.join(two, "stats.json"), "model")
    assert stats2 == stats1 and stats1["num_samples"] == 13 * 4


@pytest.mark.timeout(300)
def test_eval_on_two_processes_writes_the_one_process_numbers(tmp_path):
    one, scored1, _ = _run(tmp_path, "eval", EVAL, "one", 1)
    two, scored2, printed = _run(tmp_path, "eval", EVAL, "two", 2)
    _check_shares(scored1, scored2)
    ev1, ev2 = (_json(os.path.join(d, "eval.json"), "model", "time_s") for d in (one, two))
    assert ev2 == ev1 and ev1["num_prompts"] == 13
    assert printed.count("wrote ") == 1 and printed.count("pass@1: ") == 1  # rank 0 prints, once
    assert 0 < ev1["pass@1"] < ev1["pass@4"] < 1  # the numbers compared have spread


SFT = """
stage: sft
seed: 0
model: {name_or_path: "tiny:qwen3_moe", dtype: float32}
data: {task: add, num_samples: 64, task_kwargs: {digits: 1}}
sft: {max_steps: 2, batch_size: 4, max_length: 64}
optim: {lr: 1.0e-3, scheduler: constant}
logging: {log_every: 1, progress: false}
"""

PIPELINE = """
name: two_stages
output_dir: unused
eval: {config: eval.yaml}
stages:
  - {name: rejection_sampling, config: train.yaml}
  - {name: rs_sft, config: sft.yaml, eval: true}
"""


@pytest.mark.timeout(300)
def test_pipeline_on_two_processes_runs_each_stage_and_evaluation_once(tmp_path):
    """rejection_sampling, then an SFT on its data evaluated after it, as `gspo pipeline` on two processes: one
    process is the main one (one manifest, one log line per event), the data file is the one-process run's,
    every process takes part in the evaluation (every prompt scored once) and rank 0 writes eval.json."""
    for name, text in (("train.yaml", REJECTION), ("sft.yaml", SFT), ("eval.yaml", EVAL)):
        (tmp_path / name).write_text(text)
    one, _, _ = _run(tmp_path, "train", REJECTION, "one", 1)
    two, scored, printed = _run(tmp_path, "pipeline", PIPELINE, "two", 2)
    with open(os.path.join(one, "data.jsonl"), encoding="utf-8") as a, \
            open(os.path.join(two, "rejection_sampling", "data.jsonl"), encoding="utf-8") as b:
        assert b.read() == a.read()
    manifest = _json(os.path.join(two, "manifest.json"))
    assert [(s["name"], s["status"]) for s in manifest["stages"]] == [("rejection_sampling", "done"),
                                                                         ("rs_sft", "done")]
    assert printed.count("[pipeline] stage rejection_sampling: done") == 1
    assert printed.count("[pipeline] stage rs_sft: eval of") == 1
    with open(os.path.join(two, "rs_sft", "metrics.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    ev = _json(os.path.join(two, "rs_sft", "eval.json"))
    assert ev["num_prompts"] == 13 and manifest["stages"][1]["eval"]["pass@1"] == ev["pass@1"]
    # Scored by both processes, each completion once: the rejection stage's 13 x 4, then the evaluation's.
    assert all(scored) and len(scored[0]) + len(scored[1]) == 2 * 13 * 4
