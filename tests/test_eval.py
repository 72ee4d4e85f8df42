"""run_eval: the pass@k estimator against brute force, and pass@k / reward means of a real tiny model."""

import itertools
import json
import math

import pytest

from gspo.training.evaluation import pass_at_k, run_eval


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (the first c passing) that contain a passing sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_properties_and_errors():
    assert pass_at_k(200, 37, 1) == pytest.approx(37 / 200)  # pass@1 is the pass rate
    # Large n: the product form stays finite where C(n, k) would overflow a float.
    assert 0 < pass_at_k(5000, 3, 100) < 1 and math.isfinite(pass_at_k(5000, 3, 100))
    values = [pass_at_k(16, 5, k) for k in range(1, 17)]
    assert values == sorted(values)  # more draws never lower pass@k
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)


REWARDS_PY = '''
def always_right(prompts, completions, completion_ids=None, *, answer, **_):
    # Every row's answer column is "ok": always passes, whatever the model wrote.
    return [1.0 if a == "ok" else 0.0 for a in answer]

def even_length(prompts, completions, **_):
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]
'''


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "rewards_eval.py").write_text(REWARDS_PY)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "answer": "ok"}) + "\n" for i in range(6)))
    return root, data


def _config(root, data, *overrides):
    from gspo.config import load_config

    rewards = f"{root}/rewards_eval.py"
    return load_config(None, [
        "model.name_or_path=tiny:qwen3_moe", f"output_dir={root}/out", f"data.path={data}",
        "rollout.engine=hf_generate", "rollout.max_new_tokens=8", "rollout.prompts_per_step=4",
        "eval.num_samples=4", "eval.k=[1,2,4]", "eval.num_prompts=null",
        f"rewards=['{rewards}:always_right', {{fn: '{rewards}:even_length', name: even}}]", *overrides])


def test_always_correct_model_has_pass_at_1_of_one(eval_setup):
    root, data = eval_setup
    result = run_eval(_config(root, data))
    assert result["num_prompts"] == 6 and result["pass_reward"] == "always_right"
    assert result["pass@1"] == 1.0 and result["pass@2"] == 1.0 and result["pass@4"] == 1.0
    assert result["rewards/always_right/mean"] == 1.0
    # The written file holds the returned numbers.
    assert json.loads((root / "out" / "eval.json").read_text()) == result


def test_pass_at_1_equals_pass_rate_of_the_designated_reward(eval_setup):
    root, data = eval_setup
    result = run_eval(_config(root, data, "eval.pass_reward=even", f"output_dir={root}/even"))
    rate = result["rewards/even/mean"]
    assert 0 < rate < 1  # a random tiny model writes both parities: the check below is not vacuous
    assert result["pass@1"] == pytest.approx(rate)
    assert result["pass@1"] <= result["pass@2"] <= result["pass@4"]
    passed = [p["passed"] for p in result["per_prompt"]]
    assert result["pass@4"] == pytest.approx(sum(c > 0 for c in passed) / len(passed))
    assert result["reward/mean"] == pytest.approx(1.0 + rate)  # the weighted sum of both rewards


def test_unknown_pass_reward_is_rejected_by_validation(eval_setup):
    from gspo.config import ConfigError

    root, data = eval_setup
    with pytest.raises(ConfigError, match="eval.pass_reward"):
        _config(root, data, "eval.pass_reward=accuracy")
    with pytest.raises(ConfigError, match="eval.k"):
        _config(root, data, "eval.k=[1,5]")
