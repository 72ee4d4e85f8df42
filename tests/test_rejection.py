"""The rejection_sampling stage: what it keeps, what it writes, and that the SFT stage trains on it."""

import json
import math
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from gspo.training.evaluation import Scored
from gspo.training.rejection import REASONS, run_rejection_sampling, select


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _rc(**kw):
    base = {"min_reward": 1.0, "best_of": 0, "dedup": True, "min_tokens": 0, "max_tokens": None,
            "drop_truncated": True}
    return SimpleNamespace(**{**base, **kw})


def _scored(completions, rewards, *, n, reasons=None, tokens=None):
    return Scored(rows=[{"prompt": f"p{b}"} for b in range(len(completions) // n)], n=n, completions=completions,
                  finish_reasons=reasons or ["stop"] * len(completions),
                  num_tokens=tokens or [len(c) for c in completions], rewards=rewards, per_function={}, metrics={})


def test_select_threshold_dedup_best_of_and_reasons():
    texts = ["a", "b", " a ", "c", "dd", "e", "f", "g"]
    rewards = [1.0, 3.0, 2.0, 0.5, math.nan, 2.5, 1.5, 2.0]
    scored = _scored(texts, rewards, n=4, reasons=["stop"] * 7 + ["length"])
    accepted, rejected = select(scored, _rc(best_of=2))
    # prompt 0: c is below the threshold; " a " (2.0) beats "a" (1.0) as the kept copy; b (3.0) is best.
    assert accepted[0] == [1, 2]
    assert rejected["below_threshold"] == 2 and rejected["duplicate"] == 1  # c, NaN reward "dd"; "a"
    # prompt 1: g is truncated, best_of 2 keeps e (2.5) and f (1.5) in sample order.
    assert accepted[1] == [5, 6] and rejected["truncated"] == 1
    total = sum(map(len, accepted)) + sum(rejected.values())
    assert total == len(texts) and set(rejected) == set(REASONS)  # every sample is accounted for once


def test_select_length_bounds_and_no_threshold():
    scored = _scored(["x", "xx", "xxx", "xxxx"], [0.0, 0.1, 0.2, 0.3], n=4)
    accepted, rejected = select(scored, _rc(min_reward=None, best_of=1, min_tokens=2, max_tokens=3))
    assert accepted == [[2]]  # the best of those within 2..3 tokens
    assert rejected["too_short"] == 1 and rejected["too_long"] == 1 and rejected["beyond_best_of"] == 1


def test_mix_task_generates_reference_rows():
    from gspo.training.rejection import _mix_rows

    rows = _mix_rows(_rc(mix_task="add", mix_task_kwargs={"digits": 2}, mix_path=None), "train", 7, seed=0)
    assert len(rows) == 7 and all(r["source"] == "mix" for r in rows)
    for r in rows:  # AddTask's reference answers: right, no think block
        a, b = r["prompt"][len("What is "):-1].split("+")
        assert r["completion"] == f"<answer>{int(a) + int(b)}</answer>"


MIN_TOKENS, MAX_TOKENS = 4, 10


@pytest.fixture(scope="module")
def rs_run(warm_model, tmp_path_factory):
    from conftest import tiny_config

    root = tmp_path_factory.mktemp("rs")
    general = root / "general.jsonl"
    # More general rows than the ratio asks for (at most 0.25 x 32 prompts x best_of 3 = 24).
    general.write_text("".join(json.dumps({"prompt": f"Say w{i}.", "completion": f"w{i}"}) + "\n" for i in range(40)))
    cfg = tiny_config("rejection_sampling.yaml", root / "out", f"model.name_or_path={warm_model}",
                      "rollout.engine=hf_generate", "rollout.prompts_per_step=16", "data.num_samples=32",
                      "rejection.min_reward=1.0", "rejection.best_of=3", f"rejection.min_tokens={MIN_TOKENS}",
                      f"rejection.max_tokens={MAX_TOKENS}", f"rejection.mix_path={general}", "rejection.mix_task=null",
                      "rejection.mix_ratio=0.25")
    path = run_rejection_sampling(cfg)
    rows = _read_jsonl(path)
    stats = json.loads(Path(cfg.output_dir, "stats.json").read_text())
    return cfg, path, rows, stats


def test_accepted_rows_pass_threshold_are_distinct_and_length_bounded(rs_run):
    from gspo_rewards.synthetic import synthetic_accuracy, synthetic_format

    from gspo.training.evaluation import load_model_ref

    cfg, _, rows, stats = rs_run
    kept = [r for r in rows if r["source"] == "rejection_sampling"]
    assert kept, stats["rejected"]
    _, tokenizer = load_model_ref(cfg)
    prompts, completions = [r["prompt"] for r in kept], [r["completion"] for r in kept]
    answers = [str(sum(map(int, p[len("What is "):-1].split("+")))) for p in prompts]
    # Re-score independently of the stage: the summed reward of every kept row reaches the threshold.
    summed = [a + f for a, f in zip(synthetic_accuracy(prompts, completions, answer=answers),
                                     synthetic_format(prompts, completions))]
    assert all(s >= cfg.rejection.min_reward for s in summed)
    assert [r["reward"] for r in kept] == pytest.approx(summed)
    for r in kept:
        n_tokens = len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"])
        assert MIN_TOKENS <= n_tokens <= MAX_TOKENS, r
    per_prompt_texts: dict[str, list[str]] = {}
    # A prompt text can occur twice in the data; dedup is per row, so count per (prompt, occurrence) via stats.
    for r in kept:
        per_prompt_texts.setdefault(r["prompt"], []).append(r["completion"].strip())
    occurrences = Counter(p["prompt"] for p in stats["per_prompt"])
    for prompt, texts in per_prompt_texts.items():
        assert max(Counter(texts).values()) <= occurrences[prompt], (prompt, texts)
        assert len(texts) <= cfg.rejection.best_of * occurrences[prompt]


def test_stats_match_the_written_rows(rs_run):
    cfg, _, rows, stats = rs_run
    kept = [r for r in rows if r["source"] == "rejection_sampling"]
    mixed = [r for r in rows if r["source"] == "mix"]
    assert stats["num_prompts"] == 32 and stats["num_samples"] == 32 * cfg.rollout.group_size
    assert stats["num_accepted"] == len(kept) and stats["num_mixed"] == len(mixed) == round(0.25 * len(kept))
    assert stats["num_rows"] == len(rows)
    assert stats["acceptance_rate"] == pytest.approx(len(kept) / stats["num_samples"])
    assert sum(p["accepted"] for p in stats["per_prompt"]) == len(kept)
    by_prompt = Counter(r["prompt"] for r in kept)
    for prompt in by_prompt:
        assert by_prompt[prompt] == sum(p["accepted"] for p in stats["per_prompt"] if p["prompt"] == prompt)
    assert stats["mean_reward_accepted"] == pytest.approx(sum(r["reward"] for r in kept) / len(kept))
    assert sum(stats["rejected"].values()) + len(kept) == stats["num_samples"]
    assert len({m["completion"] for m in mixed}) == len(mixed)  # drawn without replacement
    assert all(m["prompt"] == f"Say {m['completion']}." for m in mixed)


def test_the_sft_stage_trains_on_the_written_dataset(rs_run, tmp_path):
    from conftest import tiny_config

    from gspo.training.sft import run_sft

    cfg, path, _, _ = rs_run
    sft = tiny_config("cold_start.yaml", tmp_path, f"model.name_or_path={cfg.model.name_or_path}", "data.task=null",
                      f"data.path={path}", "sft.max_steps=3", "sft.batch_size=4", "logging.log_every=1")
    final = run_sft(sft)
    assert os.path.isfile(os.path.join(final, "config.json"))
    losses = [r["loss"] for r in _read_jsonl(tmp_path / "metrics.jsonl")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_config_checks_name_the_rejection_keys(tmp_path):
    from conftest import tiny_config

    from gspo.config import ConfigError

    with pytest.raises(ConfigError, match="rejection.min_reward"):
        tiny_config("rejection_sampling.yaml", tmp_path, "rejection.min_reward=null", "rejection.best_of=0")
    with pytest.raises(ConfigError, match="rejection.mix_path"):
        tiny_config("rejection_sampling.yaml", tmp_path, "rejection.mix_task=null")
    with pytest.raises(ConfigError, match="rejection.mix_task.*valid: add"):
        tiny_config("rejection_sampling.yaml", tmp_path, "rejection.mix_task=ad")
    with pytest.raises(ConfigError, match="rejection.max_tokens"):
        tiny_config("rejection_sampling.yaml", tmp_path, "rejection.min_tokens=5", "rejection.max_tokens=4")


def test_mixed_in_messages_rows_keep_their_content(tmp_path):
    """General SFT rows in `messages` form join the accepted prompt/completion rows in one table shape."""
    import json as _json
    from types import SimpleNamespace

    from datasets import Dataset

    from gspo.training.rejection import _mix_rows

    path = tmp_path / "general.jsonl"
    path.write_text(_json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    rc = SimpleNamespace(mix_task=None, mix_task_kwargs={}, mix_path=str(path))
    from gspo.training.sft import sft_rows

    mixed = [{"prompt": "What is 1+1?", "completion": "<answer>2</answer>", "source": "accepted"},
             *_mix_rows(rc, "train", 1, seed=0)]
    data = tmp_path / "data.jsonl"  # as the stage writes it, read back as the sft stage does
    data.write_text("".join(_json.dumps(r) + "\n" for r in mixed))
    data_cfg = SimpleNamespace(task=None, path=str(data), split="train", prompt_column="prompt")
    table = Dataset.from_list(sft_rows(data_cfg, seed=0)).to_list()
    assert table[1]["prompt"] == [{"role": "user", "content": "hi"}]
    assert table[1]["completion"] == [{"role": "assistant", "content": "hello"}]
