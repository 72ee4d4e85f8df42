"""A multi-process launch (torchrun, accelerate launch, mpirun) is counted whichever launcher started it; a stage
that runs on fewer processes, or an rl launch whose prompts do not split evenly over its processes, is refused
before anything loads or is written."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY

from gspo.launch import launch_processes, process_count_problem


@pytest.mark.timeout(60)
@pytest.mark.parametrize("var", ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"])
def test_every_launcher_variable_counts(monkeypatch, var):
    for v in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    assert launch_processes() == (1, None)
    assert process_count_problem("rl", 1) is None
    monkeypatch.setenv(var, "2")
    assert launch_processes() == (2, var)
    problem = process_count_problem("rl", 1)
    assert problem is not None and f"{var}=2" in problem and "the rl stage runs on 1 process" in problem
    assert process_count_problem("sft", None) is None  # a distributed stage takes any launch
    assert process_count_problem("rl", 2) is None


@pytest.mark.timeout(60)
def test_a_nonsense_world_size_counts_as_unset(monkeypatch):
    for v in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "")
    assert launch_processes() == (1, None)


# Two real processes started by torchrun on CPU (gloo is never initialised: the refusal comes first).
@pytest.mark.timeout(240)
def test_torchrun_two_processes_refuse_prompts_that_do_not_split_and_write_nothing(tmp_path):
    out = tmp_path / "rl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for v in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(v, None)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gspo", "train",
                        os.path.join(TINY, "reasoning_rl.yaml"), f"output_dir={out}", "model.name_or_path=tiny:qwen3_moe",
                        "rollout.engine=hf_generate", "logging.progress=false", "rollout.prompts_per_step=3",
                        "algorithm.num_minibatches=1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=200, check=False)
    text = r.stdout + r.stderr
    assert r.returncode != 0, text[-3000:]
    # A process says it in one line, naming the key, the count and the variable (torchrun may stop the
    # other one first); no traceback from gspo (torchrun prints its own ChildFailedError).
    lines = [x for x in text.splitlines() if "rollout.prompts_per_step: 3 prompts cannot be split evenly" in x]
    assert 1 <= len(lines) <= 2, text[-3000:]
    assert all("WORLD_SIZE=2" in x and "multiple of 2" in x for x in lines), text[-3000:]
    assert f'File "{os.path.join(REPO, "gspo")}' not in text, text[-3000:]
    # Refused before the output folder was claimed: nothing of the run exists.
    assert not out.exists() or not any(out.iterdir()), sorted(os.listdir(out))
