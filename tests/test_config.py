"""Config loading: precedence, overrides, type and key errors, cross-field rules, registry names, docs."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml

from gspo.config import Config, ConfigError, ModelConfig, RewardSpec, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REWARD_FILE = """
def length_reward(prompts, completions, completion_ids=None, **kwargs):
    return [float(len(c)) for c in completions]
"""


def base_dict() -> dict:
    """A small valid rl config; its reward is a local file next to the config (resolved relative to it)."""
    return {
        "stage": "rl",
        "model": {"name_or_path": "tiny:qwen3_moe"},
        "data": {"task": "add", "num_samples": 32},
        "rollout": {"engine": "hf_generate", "group_size": 4, "prompts_per_step": 2},
        "algorithm": {"name": "gspo", "num_minibatches": 2},
        "rewards": ["my_reward.py:length_reward"],
    }


@pytest.fixture
def write(tmp_path):
    (tmp_path / "my_reward.py").write_text(REWARD_FILE)

    def _write(data: dict | str, name: str = "cfg.yaml") -> str:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return str(path)

    return _write


def error_of(path: str, overrides=(), validate: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), validate=validate)
    return info.value


# --- precedence, parsing, round trip ----------------------------------------------------------------------


def test_precedence_default_yaml_cli(write):
    data = base_dict()
    data["optim"] = {"lr": 1e-5, "weight_decay": 0.1}
    data["seed"] = 3
    cfg = load_config(write(data), ["optim.lr=2e-5", "seed=5"])
    assert cfg.optim.lr == 2e-5 and cfg.seed == 5  # CLI beats YAML
    assert cfg.optim.weight_decay == 0.1  # YAML beats the default
    assert cfg.optim.adam_beta2 == Config().optim.adam_beta2  # untouched default
    assert cfg.rollout.group_size == 4 and cfg.rollout.max_new_tokens == Config().rollout.max_new_tokens


def test_yaml_numbers_that_pyyaml_reads_as_strings(write):
    # PyYAML (YAML 1.1) reads `1e-6` as a string; ints are fine for floats; "4e9" is fine for an int.
    data = base_dict()
    del data["rollout"]
    text = yaml.safe_dump(data) + "optim:\n  lr: 1e-6\n  max_grad_norm: 2\n"
    text += "rollout:\n  group_size: 4\n  prompts_per_step: 2\n  kv_cache_memory_bytes: 4e9\n"
    text += "  engine: hf_generate\n"
    cfg = load_config(write(text))
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.max_grad_norm == 2.0 and isinstance(cfg.optim.max_grad_norm, float)
    assert cfg.rollout.kv_cache_memory_bytes == 4_000_000_000 and isinstance(
        cfg.rollout.kv_cache_memory_bytes, int
    )


def test_yaml_round_trip(write):
    data = base_dict()
    data["rewards"] = [
        "my_reward.py:length_reward",
        {"fn": "my_reward.py:length_reward", "name": "len2", "weight": 0.25, "kwargs": {"k": [1, 2]}},
    ]
    data["lora"] = {
        "enabled": True,
        "target_modules": ["q_proj"],
        "target_parameters": ["mlp.experts.down_proj"],
    }
    data["model"]["tiny"] = {"num_experts": 8}
    data["algorithm"].update(clip_low=2e-4, clip_high=5e-4)
    cfg = load_config(write(data))
    again = load_config(write(cfg.to_yaml(), "again.yaml"))
    assert again == cfg
    assert again.rewards[0] == RewardSpec(fn="my_reward.py:length_reward")
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()


def test_overrides_of_nested_lists_and_dicts(write):
    data = base_dict()
    data["model"]["tiny"] = {"num_experts": 8, "hidden_size": 32}
    cfg = load_config(
        write(data),
        [
            "lora.target_modules=[q_proj, v_proj]",
            "model.tiny.num_hidden_layers=3",  # merges into the YAML dict
            "data.task_kwargs={digits: 2}",
            "rewards.0.weight=0.5",  # a bare-string item receives a sub-key
            "logging.trackers=tensorboard",  # a bare string for a list
        ],
    )
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.tiny == {"num_experts": 8, "hidden_size": 32, "num_hidden_layers": 3}
    assert cfg.data.task_kwargs == {"digits": 2}
    assert cfg.rewards[0].fn == "my_reward.py:length_reward" and cfg.rewards[0].weight == 0.5
    assert cfg.logging.trackers == ["tensorboard"]
    cfg = load_config(
        write(data), ["rewards=[my_reward.py:length_reward, {fn: 'my_reward.py:length_reward', name: b}]"]
    )
    assert [r.name for r in cfg.rewards] == [None, "b"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("rewards.3.weight=1", "not an index"),
        ("algorithm.name", "not key=value"),
        ("model.name_or_path.x=1", "not a mapping"),
    ],
)
def test_malformed_overrides(write, override, fragment):
    assert fragment in str(error_of(write(base_dict()), [override], validate=False))


def test_duplicate_yaml_key_is_an_error(write):
    e = error_of(write("seed: 1\nseed: 2\n"), validate=False)
    assert "seed" in str(e) and "twice" in str(e)


# --- keys, types, choices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["yaml", "cli"])
def test_unknown_keys_name_the_closest_valid_key(write, where):
    data = base_dict()
    if where == "yaml":
        data["algorithm"]["clip_hgih"] = 4e-4
        e = error_of(write(data), validate=False)
    else:
        e = error_of(write(data), ["algorithm.clip_hgih=4e-4"], validate=False)
    msg = str(e)
    assert e.key == "algorithm.clip_hgih"
    assert (
        "did you mean 'algorithm.clip_high'" in msg and "num_minibatches" in msg
    )  # the section's valid keys
    e = error_of(write(data), ["algoritm.name=grpo"], validate=False)
    assert "'algoritm'" in str(e) and "did you mean 'algorithm'" in str(e)


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("optim.lr=abc", "optim.lr", "expected float, got str 'abc'"),
        ("rollout.group_size=[1, 2]", "rollout.group_size", "expected int, got list"),
        ("rollout.group_size=2.5", "rollout.group_size", "expected int, got float"),
        ("model.trust_remote_code=3", "model.trust_remote_code", "expected bool, got int"),
        ("lora.target_modules={a: 1}", "lora.target_modules", "expected list[str], got dict"),
        ("model.name_or_path=123", "model.name_or_path", "expected str, got int"),
        ("algorithm.beta=.nan", "algorithm.beta", "finite"),
        ("data=abc", "data", "expected a mapping"),
    ],
)
def test_wrong_types_name_key_expected_and_got(write, override, key, expected):
    e = error_of(write(base_dict()), [override], validate=False)
    assert e.key == key and str(e).startswith(key) and expected in str(e)


def test_several_errors_are_reported_together(write):
    e = error_of(write(base_dict()), ["optim.lr=abc", "rollout.top_p=2", "moe.typo=1"], validate=False)
    assert set(e.keys) == {"optim.lr", "rollout.top_p", "moe.typo"}


@pytest.mark.parametrize(
    "override, key, choices",
    [
        ("model.dtype=fp32", "model.dtype", ["float32", "bfloat16", "float16"]),
        (
            "model.experts_implementation=grouped",
            "model.experts_implementation",
            ["eager", "grouped_mm", "batched_mm"],
        ),
        ("optim.scheduler=cosin", "optim.scheduler", ["constant", "linear", "cosine"]),
        ("moe.routing_replay=r4", "moe.routing_replay", ["none", "r2", "r3"]),
        ("rewards.0.on_error=ignore", "rewards.0.on_error", ["error", "zero", "skip"]),
        ("logging.trackers=[wandb, tb]", "logging.trackers.1", ["tensorboard", "trackio", "wandb"]),
    ],
)
def test_bad_choice_lists_the_choices(write, override, key, choices):
    e = error_of(write(base_dict()), [override], validate=False)
    assert e.key == key and all(c in str(e) for c in choices)


@pytest.mark.parametrize(
    "override, key, valid",
    [
        ("algorithm.name=gspoo", "algorithm.name", "grpo"),
        ("rollout.engine=vllm_colocated", "rollout.engine", "hf_generate"),
        ("data.task=ad", "data.task", "add"),
        ("stage=rll", "stage", "sft"),
        ("model.name_or_path=tiny:qwen9_moe", "model.name_or_path", "qwen3_moe"),
        ("rewards.0.fn=no_such_reward", "rewards.0.fn", "no_such_reward"),
    ],
)
def test_unknown_registry_names_list_choices(write, override, key, valid):
    e = error_of(write(base_dict()), [override])
    assert e.key == key and valid in str(e)


def test_validate_catches_configs_built_in_code():
    cfg = Config(model=ModelConfig(name_or_path="tiny:qwen3_moe"), rewards=[RewardSpec(fn="x.py:f")])
    cfg.optim.lr = "fast"
    with pytest.raises(ConfigError, match="optim.lr"):
        cfg.validate()


def test_required_model_name(write):
    data = base_dict()
    del data["model"]
    assert error_of(write(data), validate=False).key == "model.name_or_path"


def test_validation_loads_no_model(write):
    # A model id that cannot exist anywhere: validation must not try to load it.
    cfg = load_config(write(base_dict()), ["model.name_or_path=no-such-org/no-such-model"])
    assert cfg.model.name_or_path == "no-such-org/no-such-model"


# --- cross-field rules (one test each) ---------------------------------------------------------------------


def test_minibatches_must_divide_the_rollout(write):
    e = error_of(write(base_dict()), ["algorithm.num_minibatches=3"])  # 2 prompts x 4 = 8 completions
    assert e.key == "algorithm.num_minibatches"
    assert "rollout.prompts_per_step" in str(e) and "rollout.group_size" in str(e)


def test_group_size_at_least_two(write):
    e = error_of(write(base_dict()), ["rollout.group_size=1", "algorithm.num_minibatches=1"])
    assert e.key == "rollout.group_size"


def test_clip_values_non_negative(write):
    assert error_of(write(base_dict()), ["algorithm.clip_low=-1e-4"]).key == "algorithm.clip_low"


@pytest.mark.parametrize("algorithm", ["gspo", "gspo_token"])
def test_wide_clip_on_sequence_ratios_needs_opt_in(write, algorithm):
    path = write(base_dict())
    e = error_of(path, [f"algorithm.name={algorithm}", "algorithm.clip_high=0.2"])
    assert e.key == "algorithm.clip_high" and "allow_wide_clip" in str(e) and "3e-4" in str(e)
    cfg = load_config(
        path, [f"algorithm.name={algorithm}", "algorithm.clip_high=0.2", "algorithm.allow_wide_clip=true"]
    )
    assert cfg.clip_range()[1] == 0.2
    # A token-level algorithm takes GRPO-sized clips as they are.
    assert load_config(path, ["algorithm.name=grpo", "algorithm.clip_high=0.28"]).clip_range()[1] == 0.28


def test_clip_defaults_come_from_the_algorithm(write):
    from gspo.registry import LOSSES

    path = write(base_dict())
    for name in ("gspo", "grpo"):
        spec = LOSSES.get(name)
        assert load_config(path, [f"algorithm.name={name}"]).clip_range() == (spec.clip_low, spec.clip_high)


def test_tiny_overrides_must_be_fields_of_the_family_config(write):
    # transformers configs swallow unknown keywords; the config check must not.
    e = error_of(write(base_dict()), ["model.tiny.num_layers=3"])
    assert e.key == "model.tiny.num_layers" and "num_hidden_layers" in str(e)


def test_target_parameters_need_lora(write):
    e = error_of(write(base_dict()), ["lora.target_parameters=[mlp.experts.gate_up_proj]"])
    assert e.key == "lora.target_parameters" and "lora.enabled" in str(e)


def test_tiny_overrides_need_a_tiny_model(write):
    e = error_of(write(base_dict()), ["model.name_or_path=org/model", "model.tiny.num_experts=4"])
    assert e.key == "model.tiny"


@pytest.mark.parametrize("override", ["data.path=rows.jsonl", "data.task=null"])
def test_data_exactly_one_of_task_and_path(write, override):
    e = error_of(write(base_dict()), [override])
    assert "data.task" in str(e) and "data.path" in str(e)


def test_missing_local_data_file(write, tmp_path):
    e = error_of(write(base_dict()), ["data.task=null", "data.path=missing_rows.jsonl"])
    assert e.key == "data.path" and "missing_rows.jsonl" in str(e)
    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1", "answer": "2"}\n')
    cfg = load_config(write(base_dict()), ["data.task=null", f"data.path={tmp_path / 'rows.jsonl'}"])
    assert cfg.data.path.endswith("rows.jsonl")


def test_kl_estimator_checked_when_beta_positive(write):
    path = write(base_dict())
    load_config(path, ["algorithm.kl_estimator=k9"])  # beta = 0: the estimator is never used
    e = error_of(path, ["algorithm.beta=0.01", "algorithm.kl_estimator=k9"])
    assert e.key == "algorithm.kl_estimator" and "k3" in str(e)


def test_task_kwargs_must_fit_the_task(write):
    e = error_of(write(base_dict()), ["data.task_kwargs={digts: 2}"])
    assert e.key == "data.task_kwargs" and "digits" in str(e)


def test_plugins_register_names_from_the_config_folder(write, tmp_path):
    (tmp_path / "gspo_test_plugin_tasks.py").write_text(
        "from gspo.registry import TASKS\n\n"
        "@TASKS.register('plugin_echo')\n"
        "class EchoTask:\n"
        "    def rows(self, num_samples, *, seed):\n"
        "        return [{'prompt': 'hi'}] * num_samples\n"
    )
    path = write(base_dict())
    assert error_of(path, ["data.task=plugin_echo"]).key == "data.task"  # not registered without the plugin
    cfg = load_config(path, ["data.task=plugin_echo", "plugins=[gspo_test_plugin_tasks]"])
    assert cfg.plugins == ["gspo_test_plugin_tasks"]
    assert error_of(path, ["plugins=[no_such_plugin_module]"]).key == "plugins.0"


def test_rl_needs_a_reward(write):
    assert error_of(write(base_dict()), ["rewards=[]"]).key == "rewards"


def test_missing_resume_checkpoint(write):
    assert error_of(write(base_dict()), ["resume_from=/no/such/checkpoint"]).key == "resume_from"


# --- generated docs and recipes ----------------------------------------------------------------------------


def test_docs_config_md_is_up_to_date():
    from gspo.cli import config_reference

    with open(os.path.join(REPO, "docs", "config.md"), encoding="utf-8") as f:
        committed = f.read()
    assert committed == config_reference(), (
        "docs/config.md is stale: run `gspo config-reference > docs/config.md`"
    )


def test_docs_mention_every_key():
    from gspo.cli import config_reference

    doc = config_reference()
    for section, value in Config().to_dict().items():
        keys = value if isinstance(value, dict) and section not in ("rewards",) else {}
        for key in keys:
            assert f"`{section}.{key}`" in doc
    for key in RewardSpec.model_fields:
        assert f"`rewards.N.{key}`" in doc


def _stage_configs() -> list[str]:
    paths = sorted(glob.glob(os.path.join(REPO, "recipes", "**", "*.yaml"), recursive=True))
    # Pipeline files (a top-level `stages:` list) have their own schema and their own test.
    return [p for p in paths if "stages" not in (yaml.safe_load(open(p, encoding="utf-8")) or {})]


@pytest.mark.parametrize("path", _stage_configs(), ids=lambda p: os.path.relpath(p, REPO))
def test_every_recipe_validates(path):
    cfg = load_config(path)
    assert cfg.source_path == path


def test_load_builtins_fills_every_registry_without_importing_vllm():
    # A fresh interpreter: other tests in this process may have imported vLLM themselves.
    code = (
        "import sys\n"
        "from gspo.plugins import load_builtins\n"
        "from gspo import registry as r\n"
        "load_builtins()\n"
        "regs = [r.LOSSES, r.KL_ESTIMATORS, r.ROLLOUT_ENGINES, r.REWARDS, r.TASKS,\n"
        "        r.MODEL_FAMILIES, r.STAGES]\n"
        "print([x.kind for x in regs if len(x) == 0], 'vllm' in sys.modules)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == "[] False", proc.stdout + proc.stderr


def test_r3_replay_is_refused_with_the_reason(write):
    e = error_of(write(base_dict()), ["moe.routing_replay=r3"])
    assert e.key == "moe.routing_replay" and "routed experts" in str(e) and "r2" in str(e)


def test_two_rewards_with_the_same_default_name_are_refused(write):
    e = error_of(write(base_dict()), ["rewards=[synthetic_accuracy,synthetic_accuracy]"])
    assert e.key == "rewards" and "synthetic_accuracy" in str(e)
