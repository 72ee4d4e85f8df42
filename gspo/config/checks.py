"""The rules of a config that span sections, and the registry names it uses (`check_config`)."""

from __future__ import annotations

import inspect
import os
from typing import Any

from gspo.config.parse import ConfigError, Section
from gspo.registry import closest

# Clip values from this size up are GRPO's order of magnitude (0.2); sequence ratios need ~1e-4 (GSPO 5.1).
WIDE_CLIP = 0.01


def _resolve(registry: Any, name: str, key: str, errors: list[ConfigError]) -> Any:
    if name not in registry:
        errors.append(ConfigError(f"{key}: {registry.unknown_message(name)}", key))
        return None
    return registry.get(name)


def check_config(cfg: Any) -> list[ConfigError]:
    """Each section's own rules (`Section.check`), then the rules across sections and the registry names of
    `cfg` (a `gspo.config.Config`); returns the problems (empty = valid)."""
    errors: list[ConfigError] = []

    def err(key: str, msg: str) -> None:
        errors.append(ConfigError(f"{key}: {msg}", key))

    r, a, m, d = cfg.rollout, cfg.algorithm, cfg.model, cfg.data
    n, k = cfg.completions_per_rollout, a.num_minibatches
    if n % k:
        err("algorithm.num_minibatches", "rollout.prompts_per_step * rollout.group_size = "
            f"{r.prompts_per_step} * {r.group_size} = {n} completions do not split into {k} equal "
            "minibatches; choose algorithm.num_minibatches among the divisors of that product")
    for name in type(cfg).model_fields:  # each section's own rules
        section = getattr(cfg, name)
        if isinstance(section, Section):
            errors += [ConfigError(f"{name}.{key}: {msg}", f"{name}.{key}") for key, msg in section.check()]
    is_tiny = m.name_or_path.startswith("tiny:")
    if m.tiny and not is_tiny:
        err("model.tiny", f"only applies to a `tiny:<family>` model, not {m.name_or_path!r}")
    if cfg.resume_from not in (None, "latest") and not os.path.isdir(cfg.resume_from):
        err("resume_from", f"checkpoint directory {cfg.resume_from!r} does not exist (or use `latest`)")
    t = cfg.train
    if t.eval_every and t.eval_config is None and not cfg.rewards:
        err("train.eval_every", "the evaluation scores with rewards and this config has none; set "
            "train.eval_config to an eval config (e.g. recipes/tiny/eval.yaml)")
    rs = cfg.rejection
    if cfg.stage == "rejection_sampling" and rs.min_reward is None and rs.best_of == 0:
        err("rejection.min_reward", "with rejection.best_of: 0 every sample would be accepted; set a threshold "
            "(rejection.min_reward) and/or rejection.best_of")
    from gspo.rewards import reward_name

    names = [reward_name(s) for s in cfg.rewards]
    if cfg.eval.pass_reward is not None and cfg.rewards and cfg.eval.pass_reward not in names:
        err("eval.pass_reward", f"{cfg.eval.pass_reward!r} is not a configured reward; configured: "
            f"{', '.join(names)}")
    for dup in sorted({x for x in names if names.count(x) > 1}):
        err("rewards", f"two rewards are named {dup!r}; names must be unique (they key the logged metrics): "
            "give one of them a `name:`")

    # Registry names: fill the registries first (built-ins, then the config's own plugins).
    from gspo import registry
    from gspo.plugins import load_builtins, load_plugins

    load_builtins()
    base_dir = os.path.dirname(os.path.abspath(cfg.source_path)) if cfg.source_path else None
    search_dirs = [os.getcwd()] + ([base_dir] if base_dir else [])
    for i, module in enumerate(cfg.plugins):
        try:
            load_plugins([module], search_dirs)
        except ImportError as e:
            err(f"plugins.{i}", str(e))
    stage = _resolve(registry.STAGES, cfg.stage, "stage", errors)
    if stage is not None and stage.needs_rewards and not cfg.rewards:
        err("rewards", f"stage `{cfg.stage}` needs at least one reward function, e.g. "
            "`rewards: [synthetic_accuracy]`")
    spec = _resolve(registry.LOSSES, a.name, "algorithm.name", errors)
    if spec is not None and spec.level == "sequence" and not a.allow_wide_clip:
        for name in ("clip_low", "clip_high"):
            v = getattr(a, name)
            if v is not None and v >= WIDE_CLIP:
                err(f"algorithm.{name}", f"{v} is a token-level (GRPO-sized) clip, but {a.name!r} clips "
                    "sequence ratios s_i = exp(mean_t(logp - old_logp)) (GSPO Eq. 7), which sit much closer "
                    "to 1: the paper uses 3e-4 / 4e-4 (section 5.1), and a clip >= 0.01 almost never fires. "
                    "Set algorithm.allow_wide_clip: true to keep it")
    _resolve(registry.ROLLOUT_ENGINES, r.engine, "rollout.engine", errors)
    if r.max_staleness > 0 and r.engine != "vllm_server":
        err("rollout.max_staleness", f"asynchronous rollouts need a server to generate while the trainer trains; "
            f"rollout.engine={r.engine!r} shares the trainer's device: set rollout.engine=vllm_server")
    if r.engine == "vllm_server" and r.server_url is None and not r.server_launch:
        err("rollout.server_url", "rollout.engine=vllm_server needs a running server's URL (`gspo serve CONFIG`) "
            "or rollout.server_launch: true")
    if (a.tis_cap is not None or a.tis_mask_bound is not None) and r.old_logp_source != "trainer":
        err("algorithm.tis_cap", "the behaviour correction compares the engine's logprobs with the trainer's "
            "pi_old recompute: it needs rollout.old_logp_source=trainer")
    task = _resolve(registry.TASKS, d.task, "data.task", errors) if d.task is not None else None
    if task is not None:
        try:
            inspect.signature(task).bind(**d.task_kwargs)
        except TypeError as e:
            params = [p for p in inspect.signature(task).parameters if p != "self"]
            err("data.task_kwargs", f"task {d.task!r} does not take these arguments ({e}); it takes: "
                f"{', '.join(params) or 'none'}")
    if rs.mix_task is not None:
        _resolve(registry.TASKS, rs.mix_task, "rejection.mix_task", errors)
    if a.beta > 0:
        _resolve(registry.KL_ESTIMATORS, a.kl_estimator, "algorithm.kl_estimator", errors)
    family = None
    if is_tiny:
        family_name = m.name_or_path[len("tiny:"):]
        family = _resolve(registry.MODEL_FAMILIES, family_name, "model.name_or_path", errors)
    if family is not None and m.tiny:
        # transformers configs accept any keyword silently: a misspelled size would be ignored, not rejected.
        import transformers

        config_class = getattr(transformers, family.config_class)
        init_args = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
        valid = sorted(set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
                       | init_args | set(family.sizes))
        for key in m.tiny:
            if key not in valid:
                hint = closest(key, valid)
                err(f"model.tiny.{key}", f"{family.config_class} has no field {key!r}"
                    + (f" (did you mean {hint!r}?)" if hint else ""))
    from gspo.rewards import RewardLoadError, load_reward_fn

    for i, spec_i in enumerate(cfg.rewards):
        try:
            load_reward_fn(spec_i.fn, base_dir=base_dir)
        except RewardLoadError as e:
            err(f"rewards.{i}.fn", str(e))
    return errors
