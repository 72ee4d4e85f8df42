"""Recipes: every pipeline file validates (stage configs with their wiring), accelerate configs load, launchers
build the right command, GPU recipes cite a source for every hyperparameter they change.

Stage configs (no `stages:` key) are validated one by one in tests/test_config.py.
"""

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gspo.cli import main
from gspo.config import Config
from gspo.pipeline import is_pipeline_file, validate_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")
YAMLS = sorted(glob.glob(os.path.join(RECIPES, "**", "*.yaml"), recursive=True))
PIPELINES = [p for p in YAMLS if is_pipeline_file(p)]
QWEN = os.path.join(RECIPES, "qwen3_moe")


def rel(path):
    return os.path.relpath(path, REPO)


def test_recipes_include_pipelines_for_tiny_and_both_gpu_variants():
    names = {rel(p) for p in PIPELINES}
    assert {"recipes/tiny/pipeline.yaml", "recipes/qwen3_moe/full/pipeline.yaml",
            "recipes/qwen3_moe/lora/pipeline.yaml"} <= names


@pytest.mark.parametrize("path", PIPELINES, ids=rel)
def test_every_pipeline_file_validates_with_its_wiring(path, capsys):
    pipe, stages = validate_pipeline(path)
    assert len(stages) == len(pipe.stages) >= 2
    # Every stage after the first policy stage starts from an earlier stage's output (nothing dangles).
    policy_seen = False
    for st in stages:
        if st.type in ("sft", "rl", "rejection_sampling") and policy_seen:
            assert st.wiring["model.name_or_path"]["from"] in pipe.names()
        policy_seen |= st.type in ("sft", "rl")
        for reward in st.config.rewards:
            if reward.fn == "reward_model":
                assert reward.kwargs["model_path"].startswith(os.path.abspath(pipe.output_dir))
    assert main(["validate", path]) == 0
    assert "pipeline OK" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(QWEN, "accelerate", "*.json"))), ids=rel)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_json_file(path)
    n = int(re.match(r"(\d+)gpu", os.path.basename(path)).group(1))
    assert cfg.num_processes == n and cfg.num_machines == 1
    if n > 1:
        assert str(cfg.distributed_type).endswith("FSDP")
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen3MoeDecoderLayer"


def test_accelerate_configs_for_1_2_4_and_8_gpus_differ_only_in_their_process_count():
    from accelerate.commands.config.config_args import ClusterConfig

    paths = {n: os.path.join(QWEN, "accelerate", f"{n}gpu.json") for n in (1, 2, 4, 8)}
    assert sorted(glob.glob(os.path.join(QWEN, "accelerate", "*.json"))) == sorted(paths.values())
    fsdp = {n: ClusterConfig.from_json_file(paths[n]).to_dict() for n in (2, 4, 8)}
    assert all(c["fsdp_config"]["fsdp_version"] == 2 for c in fsdp.values())
    assert fsdp[2] == {**fsdp[8], "num_processes": 2} and fsdp[4] == {**fsdp[8], "num_processes": 4}


def _launch(variant, *args, num_gpus=None):
    env = dict(os.environ, DRY_RUN="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    if num_gpus:
        env["NUM_GPUS"] = str(num_gpus)
    return subprocess.run([os.path.join(QWEN, variant, "run.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO)


@pytest.mark.parametrize("variant, gpus", [("full", 8), ("lora", 1)])
def test_launcher_runs_the_pipeline_with_overrides(variant, gpus):
    r = _launch(variant, "stages.reasoning_rl.algorithm.clip_high=5e-4")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("+ accelerate launch"))
    assert f"accelerate/{gpus}gpu.json -m gspo pipeline {QWEN}/{variant}/pipeline.yaml" in line
    assert line.endswith("stages.reasoning_rl.algorithm.clip_high=5e-4")
    assert "clip range [1 - 0.0003, 1 + 0.0005]" in r.stdout  # the override reached the stage
    assert "pipeline OK" in r.stdout


def test_launcher_runs_one_stage_and_rejects_unknown_ones():
    # A stage's dry run before the stage that writes its model: the missing folder is named, exit 2.
    r = _launch("lora", "reasoning_rl", "optim.lr=2e-5", num_gpus=8)
    assert r.returncode == 2 and "model.name_or_path: model folder 'runs/qwen3_moe/lora/cold_start/final' " \
        "does not exist" in r.stderr, r.stderr
    hub = "model.name_or_path=Qwen/Qwen3-30B-A3B"  # a Hub id: said so, not checked further
    r = _launch("lora", "reasoning_rl", "optim.lr=2e-5", hub, num_gpus=8)
    assert r.returncode == 0, r.stderr
    assert f"8gpu.json -m gspo train {QWEN}/lora/reasoning_rl.yaml optim.lr=2e-5" in r.stderr
    assert "lr 2e-05" in r.stdout and "treated as a Hugging Face Hub id" in r.stdout
    r = _launch("full", "rejection_sampling", hub)  # sampling only: one process even with NUM_GPUS=8
    assert "1gpu.json -m gspo train" in r.stderr and r.returncode == 0, r.stderr
    r = _launch("full", "reasoning")
    assert r.returncode == 2 and "unknown stage 'reasoning'" in r.stderr and "reasoning_rl" in r.stderr

    for n in (2, 4):  # each GPU count gets its own accelerate config
        r = _launch("full", "reasoning_rl", hub, num_gpus=n)
        assert r.returncode == 0 and f"accelerate/{n}gpu.json -m gspo train" in r.stderr, r.stderr
    for bad in ("3", "16", "eight"):  # anything else: one line, before anything runs
        r = _launch("full", num_gpus=bad)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"NUM_GPUS must be 1, 2, 4 or 8 (one accelerate config each in {QWEN}/accelerate), got '{bad}'"], \
            r.stderr


def _non_default_leaves(data, default, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(default.get(key), dict) and key not in ("tiny", "task_kwargs"):
            yield from _non_default_leaves(value, default[key], f"{prefix}{key}.")
        elif key not in ("stage", "seed", "output_dir") and prefix != "logging." and value != default.get(key):
            yield prefix + key, value


@pytest.mark.parametrize("path", [p for p in YAMLS if p.startswith(QWEN) and not is_pipeline_file(p)], ids=rel)
def test_gpu_recipes_cite_a_source_for_each_changed_hyperparameter(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert re.search(r"run\.sh|gspo (train|eval)", header), "the header gives the exact command"
    data = yaml.safe_load(text)
    default = Config().to_dict()
    lines = text.splitlines()
    uncited = []
    for key, value in _non_default_leaves({k: v for k, v in data.items() if k != "rewards"}, default):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # names and paths speak for themselves; numbers need a source or "guess"
        leaf = key.split(".")[-1]
        if not any(re.match(rf"\s*{re.escape(leaf)}:", line) and "#" in line for line in lines):
            uncited.append(key)
    assert not uncited, f"{rel(path)}: numbers without a source comment: {uncited}"


def test_tiny_pipeline_stage_dirs_do_not_collide_with_the_single_stage_recipes():
    """`gspo train recipes/tiny/X.yaml` writes runs/tiny/X; the pipeline writes runs/tiny/pipeline/X."""
    _, stages = validate_pipeline(os.path.join(RECIPES, "tiny", "pipeline.yaml"))
    own = {yaml.safe_load(Path(st.spec.config).read_text(encoding="utf-8")).get("output_dir") for st in stages}
    assert not own & {st.config.output_dir for st in stages}
    json.dumps([st.config.to_dict() for st in stages])  # resolved configs are what the manifest stores
