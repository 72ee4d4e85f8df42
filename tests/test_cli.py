"""The `gspo` command: the real console entry for errors, in-process `main` for the rest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import yaml

from gspo.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSPO = shutil.which("gspo", path=os.path.dirname(sys.executable)) or shutil.which("gspo")


def config_file(tmp_path, **top) -> str:
    (tmp_path / "my_reward.py").write_text(
        "def length_reward(prompts, completions, completion_ids=None, **kwargs):\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    data = {
        "model": {"name_or_path": "tiny:qwen3_moe"},
        "data": {"task": "add", "num_samples": 32},
        "rollout": {"engine": "hf_generate", "group_size": 4, "prompts_per_step": 2},
        "algorithm": {"name": "gspo", "num_minibatches": 2, "num_epochs": 2},
        "rewards": ["my_reward.py:length_reward"],
        **top,
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        list(args), check=False, capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )


def test_misspelled_key_in_yaml_via_console_script(tmp_path):
    assert GSPO, "the `gspo` console script is not installed next to this Python"
    path = config_file(tmp_path, algoritm={"name": "grpo"})
    proc = run(GSPO, "validate", path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert "'algoritm'" in proc.stderr and "did you mean 'algorithm'" in proc.stderr


def test_misspelled_key_in_override_via_python_m(tmp_path):
    proc = run(sys.executable, "-m", "gspo", "validate", config_file(tmp_path), "algorithm.clip_hgih=4e-4")
    assert proc.returncode == 2
    assert "algorithm.clip_hgih" in proc.stderr and "did you mean 'algorithm.clip_high'" in proc.stderr


def test_validate_prints_the_resolved_summary(tmp_path, capsys):
    from gspo.registry import LOSSES

    assert main(["validate", config_file(tmp_path), "--print-config"]) == 0
    out = capsys.readouterr().out
    spec = LOSSES.get("gspo")
    assert f"[1 - {spec.clip_low:g}, 1 + {spec.clip_high:g}]" in out  # the effective (default) clip range
    assert "4 optimizer steps per rollout" in out  # 2 minibatches x 2 epochs
    assert "name_or_path: tiny:qwen3_moe" in out and out.rstrip().endswith("config OK")


def test_validate_error_exits_2_with_the_key(tmp_path, capsys):
    assert main(["validate", config_file(tmp_path), "rollout.temperature=hot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: rollout.temperature: expected float")


def test_train_with_an_unregistered_stage_is_not_available(tmp_path, capsys, monkeypatch):
    """A stage the config accepts but no runner implements fails loudly instead of succeeding silently."""
    from gspo.plugins import load_builtins
    from gspo.registry import STAGES, StageSpec

    load_builtins()
    monkeypatch.setitem(STAGES._items, "distill", StageSpec("distill", runner=None, help="not written yet"))
    assert STAGES.get("distill").runner is None
    assert main(["train", config_file(tmp_path, stage="distill")]) == 2
    err = capsys.readouterr().err
    assert "not available yet" in err and "'distill'" in err


def test_train_with_a_bad_config_fails_before_running(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["train", config_file(tmp_path), f"output_dir={out_dir}", "algorithm.num_minibatches=3"]) == 2
    assert "algorithm.num_minibatches" in capsys.readouterr().err
    assert not out_dir.exists()


def test_pipeline_refuses_a_stage_config(tmp_path, capsys):
    assert main(["pipeline", config_file(tmp_path)]) == 2
    assert "is not a pipeline file" in capsys.readouterr().err


def test_config_reference_is_markdown_of_every_section(capsys):
    assert main(["config-reference"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Config reference")
    for section in (
        "model",
        "data",
        "rollout",
        "algorithm",
        "optim",
        "train",
        "moe",
        "lora",
        "rewards",
        "logging",
    ):
        assert f"## `{section}`" in out


def test_docs_stages_table_is_generated_from_the_registry():
    from gspo.cli import stages_table

    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "stages.md"), encoding="utf-8") as f:
        doc = f.read()
    assert stages_table() in doc, "docs/stages.md's table is stale: paste the output of `gspo stages`"
    for name in ("rl", "sft", "rejection_sampling", "reward_model"):
        assert f"| `{name}` |" in stages_table()

