"""The run report: where each table cell comes from, which plots exist, `gspo report` rebuilding it.

The stage directories are written by hand here (metrics.jsonl rows in the trainer's format, an eval.json in
run_eval's format), so every cell's source is known; tests/test_pipeline.py checks a report of a real run.
"""

import json

import pytest

from gspo.cli import main
from gspo.pipeline.manifest import write_manifest
from gspo.pipeline.report import stage_summary, write_report


def rl_rows(n_rollouts, accuracy, *, moe=False, reward_model=None):
    rows = []
    for rollout in range(1, n_rollouts + 1):
        for mb in range(4):
            row = {"step": (rollout - 1) * 4 + mb + 1, "rollout": rollout, "loss": 0.1, "reward": accuracy(rollout),
                   "rewards/synthetic_accuracy/mean": accuracy(rollout), "completions/mean_length": 10.0 + rollout,
                   "clip_frac/low": 0.01, "clip_frac/high": 0.02}
            if moe:
                row.update({"moe/load_max_over_mean": 1.5, "moe/load_cv": 0.3, "moe/layer0/load_cv": 0.3})
            if reward_model is not None:
                row["rewards/reward_model/mean"] = reward_model
            rows.append(row)
    return rows


def write_stage(root, name, rows=(), eval_result=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if eval_result is not None:
        (d / "eval.json").write_text(json.dumps(eval_result))
    return d


@pytest.fixture
def run_dir(tmp_path):
    # Accuracy climbs from 0.0 to 0.9 over 10 rollouts: the last 10% of rows are rollout 10's.
    write_stage(tmp_path, "cold_start", [{"step": s, "rollout": 0, "loss": 2.0 / s} for s in range(1, 11)],
                eval_result={"pass@1": 0.2, "rewards/synthetic_accuracy/mean": 0.25,
                             "rewards/synthetic_format/mean": 0.9, "per_prompt": [{"prompt": "p", "passed": 1}]})
    write_stage(tmp_path, "reasoning_rl", rl_rows(10, lambda r: (r - 1) / 10, moe=True))
    write_stage(tmp_path, "reward_model", [{"step": 1, "rollout": 0, "loss": 0.6}],
                eval_result={"eval/accuracy": 0.8, "accuracy": 0.8})
    write_stage(tmp_path, "alignment_rl", rl_rows(5, lambda r: 0.5, reward_model=1.25))
    stages = [{"name": "cold_start", "type": "sft", "status": "done", "wall_s": 12.0},
              {"name": "reasoning_rl", "type": "rl", "status": "done", "wall_s": 300.0},
              {"name": "reward_model", "type": "reward_model", "status": "done", "wall_s": 5.0},
              {"name": "alignment_rl", "type": "rl", "status": "running", "wall_s": None}]
    write_manifest(str(tmp_path), {"name": "t", "output_dir": str(tmp_path), "stages": stages})
    return tmp_path


def test_cells_come_from_eval_then_metrics_and_stay_empty_when_unmeasured(run_dir):
    cold = stage_summary(str(run_dir / "cold_start"), "sft")
    assert cold["accuracy"] == 0.25  # eval.json's mean accuracy reward, not the SFT loss rows
    assert cold["format rate"] == 0.9
    assert cold["alignment reward"] is None
    rl = stage_summary(str(run_dir / "reasoning_rl"), "rl")
    assert rl["accuracy"] == pytest.approx(0.9)  # last 10% of the rows: rollout 10
    assert rl["rewards/synthetic_accuracy/mean/first"] == pytest.approx(0.0)
    assert rl["format rate"] is None
    assert stage_summary(str(run_dir / "alignment_rl"), "rl")["alignment reward"] == 1.25
    # A reward model's eval.json is its pairwise accuracy: never the task accuracy column.
    rm = stage_summary(str(run_dir / "reward_model"), "reward_model")
    assert rm["accuracy"] is None and rm["eval"]["eval/accuracy"] == 0.8


def test_report_table_and_plots(run_dir, capsys):
    table = write_report(str(run_dir))
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "type", "status", "accuracy", "format", "rate", "alignment", "reward",
                                "wall", "time"]
    row = {line.split()[0]: line for line in lines[2:] if line and not line.startswith("total")}
    assert "0.250" in row["cold_start"] and "0.900" in row["cold_start"] and "12 s" in row["cold_start"]
    assert "0.900" in row["reasoning_rl"] and "5.0 min" in row["reasoning_rl"]
    assert row["reward_model"].split()[3:] == ["5", "s"]  # no task columns for the reward model
    assert "1.250" in row["alignment_rl"] and "running" in row["alignment_rl"]
    report = (run_dir / "report.md").read_text()
    for plot in ("reward", "accuracy", "length", "clip_fraction", "expert_load", "sft_loss"):
        assert (run_dir / f"{plot}.png").stat().st_size > 1000
        assert f"]({plot}.png)" in report
    assert "| reasoning_rl | rl | done | 0.900 |" in report


def test_no_expert_load_plot_without_moe_metrics(tmp_path):
    write_stage(tmp_path, "rl", rl_rows(3, lambda r: 0.5))
    write_manifest(str(tmp_path), {"name": "t", "stages": [{"name": "rl", "type": "rl", "status": "done"}]})
    write_report(str(tmp_path))
    assert (tmp_path / "reward.png").exists() and not (tmp_path / "expert_load.png").exists()
    assert "expert_load.png" not in (tmp_path / "report.md").read_text()


def test_gspo_report_rebuilds_the_report(run_dir, tmp_path_factory, capsys):
    (run_dir / "report.md").unlink(missing_ok=True)
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "reasoning_rl" in out and (run_dir / "report.md").exists()
    empty = tmp_path_factory.mktemp("empty")
    assert main(["report", str(empty)]) == 2
    assert "manifest.json" in capsys.readouterr().err
