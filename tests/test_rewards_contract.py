"""The reward contract: loading, the start-up parameter check, weighting, concurrency, the failure policy."""

import asyncio
import math
import textwrap

import pytest
import torch

from gspo.algorithms.advantages import group_advantages
from gspo.rewards import RewardError, RewardLoadError, RewardSet, load_reward_fn

PROMPTS = ["What is 2+2?", "What is 3+3?", "Name a colour."]
COMPLETIONS = ["<answer>4</answer>", "<answer>7</answer>", "<answer>red</answer>"]
IDS = [[1, 2], [3, 4, 5], [6]]
COLUMNS = {"answer": ["4", "6", "red"], "difficulty": [1, 2, 3]}


def spec(fn, **kw):
    return {"fn": fn, **kw}


def build(*specs, columns=tuple(COLUMNS), base_dir=None):
    return RewardSet.from_specs(list(specs), columns=list(columns), base_dir=base_dir)


def call(rs, completions=COMPLETIONS, columns=COLUMNS):
    return rs(PROMPTS, completions, IDS, columns)


# ---------------------------------------------------------------------------------------------- loading


def test_registered_name_loads_and_unknown_name_suggests_the_closest():
    assert load_reward_fn("math_accuracy").__name__ == "math_accuracy"
    with pytest.raises(RewardLoadError) as e:
        load_reward_fn("math_acuracy")
    assert "math_accuracy" in str(e.value) and "format_strict" in str(e.value)


def test_module_reference_loads():
    from gspo_rewards.format import tag_count

    assert load_reward_fn("gspo_rewards.format:tag_count") is tag_count
    with pytest.raises(RewardLoadError, match="tag_count"):  # closest callable suggested
        load_reward_fn("gspo_rewards.format:tag_cont")
    with pytest.raises(RewardLoadError, match="no_such_module"):
        load_reward_fn("no_such_module:fn")


def test_file_reference_resolves_against_cwd_then_base_dir(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "recipe"
    (recipe_dir / "my").mkdir(parents=True)
    (recipe_dir / "my" / "rw.py").write_text("def length_reward(completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RewardLoadError, match="not found"):
        load_reward_fn("my/rw.py:length_reward")  # not relative to the cwd
    fn = load_reward_fn("my/rw.py:length_reward", base_dir=recipe_dir)
    assert fn(["ab", "c"]) == [2.0, 1.0]
    assert load_reward_fn("recipe/my/rw.py:length_reward").__name__ == "length_reward"  # relative to the cwd
    with pytest.raises(RewardLoadError, match="length_reward"):
        load_reward_fn("my/rw.py:lenght_reward", base_dir=recipe_dir)


def test_file_that_fails_to_import_names_the_reference(tmp_path):
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(RewardLoadError, match=r"bad\.py:fn.*boom at import"):
        load_reward_fn(str(tmp_path / "bad.py") + ":fn")


# -------------------------------------------------------------------------------- start-up parameter check


def test_unknown_parameter_names_function_parameter_and_columns(tmp_path):
    (tmp_path / "r.py").write_text("def acc(prompts, completions, solution, **kw):\n    return [1.0] * len(completions)\n")
    with pytest.raises(RewardLoadError) as e:
        build(spec(str(tmp_path / "r.py") + ":acc"))
    msg = str(e.value)
    assert "'acc'" in msg and "'solution'" in msg and "answer" in msg and "difficulty" in msg


def test_parameter_with_default_is_still_checked(tmp_path):
    # `solution=None` would silently stay None forever in TRL; here it is an error.
    (tmp_path / "r.py").write_text("def acc(completions, solution=None):\n    return [0.0] * len(completions)\n")
    with pytest.raises(RewardLoadError, match="solution"):
        build(spec(str(tmp_path / "r.py") + ":acc"))


def test_column_and_kwarg_parameters_pass_and_var_kwargs_gets_every_column(tmp_path):
    (tmp_path / "r.py").write_text(textwrap.dedent("""
        SEEN = {}
        def by_column(completions, answer, scale):
            return [scale * float(c == f"<answer>{a}</answer>") for c, a in zip(completions, answer)]
        def spy(prompts, completions, **kwargs):
            SEEN.update(kwargs)
            return [0.0] * len(completions)
    """))
    rs = build(spec(f"{tmp_path}/r.py:by_column", kwargs={"scale": 2.0}), spec(f"{tmp_path}/r.py:spy"))
    out = call(rs)
    assert out.per_function["by_column"].tolist() == [2.0, 0.0, 2.0]
    seen = load_reward_fn(f"{tmp_path}/r.py:spy").__globals__["SEEN"]
    assert seen["answer"] == COLUMNS["answer"] and seen["difficulty"] == COLUMNS["difficulty"]
    assert seen["completion_ids"] == IDS


def test_missing_declared_column_and_unknown_kwarg_are_errors(tmp_path):
    with pytest.raises(RewardLoadError, match="'solution'.*answer"):
        build(spec("math_accuracy", kwargs={"answer_column": "solution"}))
    (tmp_path / "r.py").write_text("def r(completions):\n    return [0.0] * len(completions)\n")
    with pytest.raises(RewardLoadError, match="'scale' is not a parameter"):
        build(spec(f"{tmp_path}/r.py:r", kwargs={"scale": 1}))


def test_a_call_without_a_checked_column_is_a_wiring_error():
    rs = build(spec("math_accuracy"))
    with pytest.raises(ValueError, match="'math_accuracy' needs column.*answer.*passed: difficulty"):
        call(rs, columns={"difficulty": COLUMNS["difficulty"]})


def test_spec_validation_lists_valid_choices():
    with pytest.raises(RewardLoadError, match="error, zero, skip"):
        build(spec("format_soft", on_error="ignore"))
    with pytest.raises(RewardLoadError, match="distinct"):
        build(spec("format_soft"), spec("format_soft"))
    rs = build(spec("format_soft"), spec("format_soft", name="format_soft_2"))
    assert rs.names == ["format_soft", "format_soft_2"]


def test_config_reward_spec_objects_are_accepted():
    from gspo.config import RewardSpec

    rs = RewardSet.from_specs([RewardSpec(fn="tag_count", weight=0.5)], columns=[])
    assert call(rs).rewards.tolist() == [0.25, 0.25, 0.25]  # 0.5 * (two answer tags of four)


# ------------------------------------------------------------------------------------- weighting and metrics


def _abstaining(tmp_path):
    (tmp_path / "r.py").write_text(textwrap.dedent("""
        def first_abstains(completions, **kw):
            return [None, 1.0, 1.0]
        def always_two(completions, **kw):
            return [2.0] * len(completions)
        def all_none(completions, **kw):
            return [None] * len(completions)
    """))
    return lambda name, **kw: spec(f"{tmp_path}/r.py:{name}", **kw)


def test_weighted_sum_skips_abstentions_without_renormalizing(tmp_path):
    s = _abstaining(tmp_path)
    out = call(build(s("first_abstains", weight=1.0), s("always_two", weight=0.5)))
    # Sample 0: only always_two scores -> 0.5 * 2 = 1.0 (NOT renormalized to 2.0); others 1 + 1 = 2.
    assert out.rewards.tolist() == [1.0, 2.0, 2.0]
    assert out.rewards.dtype == torch.float32
    assert math.isnan(out.per_function["first_abstains"][0])
    assert out.metrics["rewards/first_abstains/abstain_rate"] == pytest.approx(1 / 3)
    assert out.metrics["rewards/first_abstains/mean"] == 1.0  # abstentions excluded from the mean
    assert out.metrics["rewards/always_two/std"] == 0.0
    assert out.metrics["rewards/always_two/errors"] == 0.0


def test_all_abstained_sample_is_nan_and_its_group_gets_zero_advantage(tmp_path):
    s = _abstaining(tmp_path)
    rs = RewardSet.from_specs([s("all_none")], columns=[])
    out = rs(["p"] * 4, ["a", "b", "c", "d"], [[1]] * 4, {})
    assert torch.isnan(out.rewards).all()
    adv = group_advantages(out.rewards, group_size=2)
    assert torch.equal(adv, torch.zeros(4))


def test_conversational_completions_are_supported():
    conv = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    rs = build(spec("math_accuracy"))
    expected = torch.tensor([1.0, 0.0, math.nan])  # "red" is no math answer: the gold abstains
    assert torch.allclose(call(rs, conv).rewards, expected, equal_nan=True)
    assert torch.allclose(call(rs).rewards, expected, equal_nan=True)


def test_log_metric_reaches_the_metrics(tmp_path):
    (tmp_path / "r.py").write_text(
        "def r(completions, log_metric, **kw):\n    log_metric('calls', 1)\n    return [0.0] * len(completions)\n"
    )
    assert call(build(spec(f"{tmp_path}/r.py:r"))).metrics["rewards/r/calls"] == 1.0


# ------------------------------------------------------------------------------------------ concurrency


def test_async_rewards_run_concurrently(tmp_path):
    # Each function waits for an event that only the OTHER sets: sequential execution would time out.
    (tmp_path / "r.py").write_text(textwrap.dedent("""
        import asyncio
        EVENTS = {}
        async def ping(completions, **kw):
            EVENTS.setdefault("ping", asyncio.Event()).set()
            await asyncio.wait_for(EVENTS.setdefault("pong", asyncio.Event()).wait(), 10)
            return [1.0] * len(completions)
        async def pong(completions, **kw):
            EVENTS.setdefault("pong", asyncio.Event()).set()
            await asyncio.wait_for(EVENTS.setdefault("ping", asyncio.Event()).wait(), 10)
            return [2.0] * len(completions)
    """))
    rs = build(spec(f"{tmp_path}/r.py:ping", on_error="error"), spec(f"{tmp_path}/r.py:pong"))
    out = call(rs)
    assert out.rewards.tolist() == [3.0, 3.0, 3.0]


def test_rewards_work_when_called_from_a_running_event_loop():
    rs = build(spec("format_soft"))

    async def inside():
        return call(rs)

    assert asyncio.run(inside()).rewards.tolist() == [0.0, 0.0, 0.0]


# -------------------------------------------------------------------------------------- failure policy

FAILING = textwrap.dedent("""
    import asyncio, threading
    RELEASE = threading.Event()
    def raises(completions, **kw):
        raise ZeroDivisionError("bad row")
    def nan_second(completions, **kw):
        return [1.0, float("nan"), 1.0]
    def inf_second(completions, **kw):
        return [1.0, float("inf"), 1.0]
    def short(completions, **kw):
        return [1.0]
    def not_a_list(completions, **kw):
        return 1.0
    def str_second(completions, **kw):
        return [1.0, "1.0", 1.0]
    def slow_sync(completions, **kw):
        RELEASE.wait(30)  # released by the test after the time-out fired
        return [1.0] * len(completions)
    async def slow_async(completions, **kw):
        await asyncio.sleep(30)
        return [1.0] * len(completions)
""")

# name -> which samples are affected (the rest score 1.0 where the function returned values)
CASES = [
    ("raises", [0, 1, 2], "ZeroDivisionError"),
    ("nan_second", [1], "non-finite"),
    ("inf_second", [1], "non-finite"),
    ("short", [0, 1, 2], "1 values for 3"),
    ("not_a_list", [0, 1, 2], "float"),
    ("str_second", [1], "str"),
    ("slow_sync", [0, 1, 2], "timeout_s=0.2"),
    ("slow_async", [0, 1, 2], "timeout_s=0.2"),
]


@pytest.fixture
def failing(tmp_path):
    (tmp_path / "failing.py").write_text(FAILING)
    yield lambda name, **kw: spec(f"{tmp_path}/failing.py:{name}", timeout_s=0.2, **kw)
    load_reward_fn(f"{tmp_path}/failing.py:raises").__globals__["RELEASE"].set()


@pytest.mark.parametrize("name,affected,reason", CASES)
def test_on_error_error_names_function_and_sample(failing, name, affected, reason):
    rs = build(failing(name, on_error="error"))
    with pytest.raises(RewardError) as e:
        call(rs)
    msg = str(e.value)
    first = affected[0]
    assert f"'{name}'" in msg and reason in msg and f"sample {first}" in msg
    assert PROMPTS[first] in msg and COMPLETIONS[first] in msg


@pytest.mark.parametrize("name,affected,reason", CASES)
@pytest.mark.parametrize("policy", ["zero", "skip"])
def test_on_error_zero_and_skip(failing, name, affected, reason, policy):
    rs = build(failing(name, on_error=policy), spec("tag_count"))  # tag_count scores 0.5 everywhere
    out = call(rs)
    values = out.per_function[name]
    for i in range(3):
        if i in affected:
            assert (values[i] == 0.0) if policy == "zero" else torch.isnan(values[i])
            assert out.rewards[i] == 0.5  # the other function still counts
        else:
            assert values[i] == 1.0
    assert out.metrics[f"rewards/{name}/errors"] == len(affected)
    expected_abstain = len(affected) / 3 if policy == "skip" else 0.0
    assert out.metrics[f"rewards/{name}/abstain_rate"] == pytest.approx(expected_abstain)


def test_timed_out_sync_reward_does_not_block_the_next_call(failing):
    rs = build(failing("slow_sync", on_error="zero"))
    for _ in range(2):
        assert call(rs).rewards.tolist() == [0.0, 0.0, 0.0]  # each call times out on its own deadline


def _bounded(fn, seconds=20):
    """Run fn in a daemon thread; (finished, result or exception). A test of a hang must not hang itself."""
    import threading

    box = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            box["out"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), box.get("out")


def test_a_reward_that_never_returns_times_out_by_default(failing, monkeypatch):
    """No timeout_s in the spec: the default applies (300 s; shortened here) and names the reward."""
    import gspo.rewards.loading

    monkeypatch.setattr(gspo.rewards.loading, "DEFAULT_REWARD_TIMEOUT_S", 0.3)
    hanging = {k: v for k, v in failing("slow_sync", on_error="error").items() if k != "timeout_s"}
    finished, out = _bounded(lambda: call(build(hanging)))
    assert finished, "the reward call hung: no default time-out"
    assert isinstance(out, RewardError) and "'slow_sync'" in str(out) and "timeout_s=0.3" in str(out)
    # on_error applies to a time-out as to an exception
    finished, out = _bounded(lambda: call(build({**hanging, "on_error": "zero"})))
    assert finished and out.rewards.tolist() == [0.0, 0.0, 0.0]


def test_timeout_off_only_when_set_so_explicitly():
    from gspo.config import DEFAULT_REWARD_TIMEOUT_S, RewardSpec

    assert RewardSpec(fn="format_soft").timeout_s == DEFAULT_REWARD_TIMEOUT_S > 0
    assert build(spec("format_soft")).rewards[0].timeout_s == DEFAULT_REWARD_TIMEOUT_S
    assert build(spec("format_soft", timeout_s=None)).rewards[0].timeout_s is None


def test_huge_finite_rewards_fall_under_on_error_not_overflow(tmp_path):
    """±1e308 is finite as a Python float but not as float32: it used to become ±inf after the check."""
    (tmp_path / "big.py").write_text("def big(completions, **kw):\n    return [1.0, 1e308, -1e308]\n")
    with pytest.raises(RewardError, match=r"'big'.*1e\+308.*sample 1"):
        call(build(spec(f"{tmp_path}/big.py:big")))
    out = call(build(spec(f"{tmp_path}/big.py:big", on_error="zero")))
    assert out.rewards.tolist() == [1.0, 0.0, 0.0] and torch.isfinite(out.rewards).all()


def test_a_reward_that_abstains_on_every_sample_is_warned_about(tmp_path, caplog):
    (tmp_path / "none.py").write_text("def never(completions, **kw):\n    return [None] * len(completions)\n")
    rs = build(spec(f"{tmp_path}/none.py:never"), spec("tag_count"))
    with caplog.at_level("WARNING", logger="gspo"):
        call(rs)
    assert any("'never'" in r.getMessage() and "abstained on every sample" in r.getMessage()
               for r in caplog.records)
