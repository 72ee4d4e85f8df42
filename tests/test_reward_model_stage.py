"""The reward_model stage: TRL RewardTrainer on synthetic preference pairs, consumed by the reward_model reward."""

import json
import os
import statistics
from pathlib import Path

import pytest

from gspo.data import ConciseAddTask
from gspo.training.reward_model import preference_rows, run_reward_model


def test_preference_pairs_prefer_concise_then_well_formed():
    from gspo_rewards.synthetic import synthetic_format

    pairs = ConciseAddTask().preference_rows(400, seed=3)
    assert len(pairs) == 400
    chosen, rejected = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    assert synthetic_format(None, chosen) == [1.0] * 400  # the preferred side is always well-formed
    style = [p for p, ok in zip(pairs, synthetic_format(None, rejected)) if ok]
    for p in style:  # a well-formed rejected side differs by its think block only
        assert "<think>" not in p["chosen"] and p["rejected"].startswith("<think>")
        assert p["rejected"].endswith(p["chosen"])
    assert 0.35 < len(style) / 400 < 0.65  # both kinds of pairs are common
    wrong = sum(p["chosen"].rpartition("<answer>")[2] != f"{p['answer']}</answer>" for p in pairs)
    assert 0.3 < wrong / 400 < 0.7  # right and wrong answers on the preferred side: correctness is no signal


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import tiny_config

    out = tmp_path_factory.mktemp("rm")
    cfg = tiny_config("reward_model.yaml", out, "data.num_samples=512")
    return cfg, run_reward_model(cfg)


def test_reaches_pairwise_accuracy_well_above_chance_on_held_out_pairs(trained):
    cfg, final = trained
    report = json.loads(Path(cfg.output_dir, "eval.json").read_text())
    assert report["eval/num_pairs"] == round(0.1 * 512)
    assert report["eval/accuracy"] >= 0.8, report
    rows = [json.loads(line) for line in Path(cfg.output_dir, "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and rows[-1]["eval/accuracy"] == report["eval/accuracy"]
    assert os.path.isfile(os.path.join(final, "config.json"))


def test_output_loads_in_the_reward_and_prefers_chosen(trained):
    from gspo.rewards import RewardSet

    _, final = trained
    fresh = ConciseAddTask().preference_rows(64, seed=12345)  # pairs the stage never saw
    rs = RewardSet.from_specs([{"fn": "reward_model", "kwargs": {"model_path": final}}], columns=[])
    prompts = [p["prompt"] for p in fresh]
    chosen = rs(prompts, [p["chosen"] for p in fresh], [[1]] * 64, {}).rewards.tolist()
    rejected = rs(prompts, [p["rejected"] for p in fresh], [[1]] * 64, {}).rewards.tolist()
    assert statistics.mean(chosen) > statistics.mean(rejected)
    assert sum(c > r for c, r in zip(chosen, rejected)) / 64 >= 0.8


def test_jsonl_pairs_and_a_task_without_pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"question": "Hi?", "chosen": "Hello.", "rejected": "Go away."}) + "\n")
    data = type("D", (), {"task": None, "path": str(path), "split": "train", "prompt_column": "question",
                          "num_samples": 1, "task_kwargs": {}})()
    assert preference_rows(data, seed=0) == [{"prompt": [{"role": "user", "content": "Hi?"}],
                                              "chosen": [{"role": "assistant", "content": "Hello."}],
                                              "rejected": [{"role": "assistant", "content": "Go away."}]}]
    data.task = "add"
    with pytest.raises(ValueError, match="add_concise"):
        preference_rows(data, seed=0)
    data.task, data.path = None, str(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello."}) + "\n")
    with pytest.raises(ValueError, match="rejected"):
        preference_rows(data, seed=0)


def test_starts_from_a_local_causal_lm_checkpoint(warm_model, tmp_path):
    """The usual start in practice: the SFT policy's weights under a new scalar head."""
    from conftest import tiny_config
    from gspo_rewards.reward_model import reward_model

    cfg = tiny_config("reward_model.yaml", tmp_path, f"model.name_or_path={warm_model}", "data.num_samples=64",
                      "reward_model.max_steps=2")
    final = run_reward_model(cfg)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(final)
    assert config.architectures[0].endswith("ForSequenceClassification") and config.num_labels == 1
    scores = reward_model(["What is 2+3?"] * 2, ["<answer>5</answer>", "5"], model_path=final)
    assert len(scores) == 2 and scores[0] != scores[1]
