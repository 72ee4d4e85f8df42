"""The stages built on TRL trainers (sft, reward_model) on two real processes (torchrun, gloo, data parallel as TRL
runs them) against one process with the same global batch (one process: 2 x the per-process batch): every logged
number and the final weights agree, and one process writes metrics.jsonl, final/ (and eval.json)."""

from __future__ import annotations

import json
import os

import pytest
from conftest import TINY
from test_distributed_rl import assert_same_rows, final_weights, metrics, run_gspo


def _same_weights(one: dict, two: dict) -> None:
    assert set(one) == set(two) and one
    for k, a in one.items():
        err = float((two[k] - a).norm())
        assert err <= 1e-4 * float(a.norm()) + 1e-6, (k, err)


def _compare(tmp_path, config: str, section: str, *overrides: str) -> tuple[list[dict], list[dict]]:
    r2 = run_gspo(config, tmp_path / "two", 2, *overrides, f"{section}.batch_size=8")
    r1 = run_gspo(config, tmp_path / "one", 1, *overrides, f"{section}.batch_size=16")
    assert r1.returncode == 0, (r1.stdout + r1.stderr)[-3000:]
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert_same_rows(one, two)
    _same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))
    return one, two


@pytest.mark.timeout(400)
def test_sft_on_two_processes_equals_one_with_the_same_global_batch(tmp_path):
    """Each process takes its 8 rows of each 16-row step (TRL's data-parallel sampler), the loss averaged over the
    global batch's tokens: the same losses and weights as one process with batches of 16; the `tiny:` model is
    built once into output_dir."""
    one, two = _compare(tmp_path, os.path.join(TINY, "cold_start.yaml"), "sft", "sft.max_steps=4",
                        "logging.log_every=1", "logging.progress=false")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # one row per step: written by one process
    assert one[-1]["loss"] < one[0]["loss"]  # it trained (the comparison is not of untouched weights)


@pytest.mark.timeout(400)
def test_reward_model_on_two_processes_equals_one_with_the_same_global_batch(tmp_path):
    one, two = _compare(tmp_path, os.path.join(TINY, "reward_model.yaml"), "reward_model", "data.num_samples=71",
                        "logging.log_every=1", "logging.progress=false")
    assert [r["step"] for r in two] == [1, 2, 3, 4, 4]  # 64 training pairs / 16; the last row: the evaluation
    with open(tmp_path / "two" / "eval.json", encoding="utf-8") as f:
        assert json.load(f)["eval/accuracy"] == pytest.approx(one[-1]["eval/accuracy"])
