"""Typed run configuration: one YAML file per stage, `key.sub=value` overrides, validation.

A config is a `Config`: a few top-level keys plus one section per concern (`gspo.config.sections`) and a
list of `rewards`. Precedence: field default < YAML file < command-line override. Overrides are
`key.sub=value`, the value parsed as YAML (`algorithm.clip_high=4e-4`, `lora.target_modules=[q_proj,v_proj]`,
`model.tiny.num_experts=8`, `rewards.0.weight=0.5`, `rewards=[synthetic_accuracy,synthetic_format]`).

`load_config` checks keys, types and ranges (a `ConfigError` naming the dotted key, worded by
`gspo.config.parse`); `Config.validate()` adds the rules that span fields and resolves every registry name
(`gspo.config.checks`). Nothing here loads a model.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import yaml
from pydantic import PrivateAttr

from gspo.config.checks import check_config
from gspo.config.parse import Section, _raise, apply_overrides, build, field, read_yaml, section
from gspo.config.sections import (
    AlgorithmConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LoRAConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    RejectionConfig,
    RewardModelConfig,
    RewardSpec,
    RolloutConfig,
    SFTConfig,
    TrainConfig,
)


class Config(Section):
    """A whole run: top-level keys, one section per concern, the reward functions."""

    stage: str = field("rl",
        "What `gspo train` runs: a stage registered in `gspo.registry.STAGES` (the built-in ones: "
        "docs/stages.md).")
    seed: int = field(0, "Seed for sampling, shuffling, initialization.")
    output_dir: str = field("runs/gspo", "Checkpoints, metrics.jsonl, the resolved config.")
    resume_from: str | None = field(None,
        "`latest` = the newest checkpoint in output_dir, or a checkpoint directory; null = start fresh.")
    overwrite: bool = field(False,
        "Write into an output_dir that holds an earlier run (its outputs are deleted first, only what it "
        "wrote, as listed in `gspo_run.json`) or files gspo did not write (they are kept). Without it such a "
        "folder is refused.")
    plugins: list[str] = field([],
        "Modules imported before validation, so their registrations (tasks, losses, rewards, engines, "
        "stages) are available by name.")
    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    algorithm: AlgorithmConfig = section(AlgorithmConfig)
    optim: OptimConfig = section(OptimConfig)
    train: TrainConfig = section(TrainConfig)
    moe: MoEConfig = section(MoEConfig)
    lora: LoRAConfig = section(LoRAConfig)
    sft: SFTConfig = section(SFTConfig)
    rejection: RejectionConfig = section(RejectionConfig)
    reward_model: RewardModelConfig = section(RewardModelConfig)
    eval: EvalConfig = section(EvalConfig)
    rewards: list[RewardSpec] = field([],
        "Reward functions, summed with their weights (at least one for stage `rl`).")
    logging: LoggingConfig = section(LoggingConfig)
    # Where the config was read from (not a config key): relative reward files resolve against its folder.
    _source_path: str | None = PrivateAttr(default=None)

    @property
    def source_path(self) -> str | None:
        return self._source_path

    @source_path.setter
    def source_path(self, value: str | None) -> None:
        self._source_path = value

    def __eq__(self, other: object) -> bool:  # the keys only, not where they were read from
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """Build from a nested dict (as read from YAML) and `key.sub=value` overrides; checks keys, types."""
        return build(cls, apply_overrides(data, overrides))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every key (YAML-safe); `Config.from_dict(cfg.to_dict()) == cfg`."""
        return self.model_dump(mode="python", warnings=False)  # validate() reports bad values itself

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False, width=110)

    # -- derived values the trainer and the CLI report ----------------------------------------------------

    @property
    def completions_per_rollout(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.group_size

    @property
    def optimizer_steps_per_rollout(self) -> int:
        return self.algorithm.num_minibatches * self.algorithm.num_epochs

    @property
    def total_optimizer_steps(self) -> int:
        return self.train.num_rollouts * self.optimizer_steps_per_rollout

    @property
    def rollout_dtype(self) -> str:
        return self.rollout.dtype or self.model.dtype

    def clip_range(self) -> tuple[float, float]:
        """(clip_low, clip_high) in effect: the configured values, or the algorithm's defaults."""
        from gspo.plugins import load_builtins
        from gspo.registry import LOSSES

        load_builtins()
        spec = LOSSES.get(self.algorithm.name)
        low, high = self.algorithm.clip_low, self.algorithm.clip_high
        return (spec.clip_low if low is None else low, spec.clip_high if high is None else high)

    def validate(self) -> Config:
        """Re-check types, then every cross-field rule and registry name. Returns self; raises ConfigError."""
        Config.from_dict(self.to_dict())  # keys, types and ranges (catches configs built in code)
        _raise(check_config(self))
        return self


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (), *,
                validate: bool = True) -> Config:
    """Read a YAML config (or only defaults when `path` is None), apply overrides, optionally validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    cfg = Config.from_dict(data, overrides)
    if path is not None:
        cfg.source_path = str(path)
        resolve_relative_paths(cfg)
    return cfg.validate() if validate else cfg


def resolve_input_path(value: str, source_path: str | None, key: str) -> str:
    """The one rule for a relative input path (data file, model folder, reward file, checkpoint): relative to
    the config file's folder; when nothing is there but the path exists relative to the current directory,
    that one is used and the fallback is logged. Absolute paths, `~` and names that exist nowhere (Hub ids,
    missing files: the checks name them) are returned unchanged."""
    if not source_path or os.path.isabs(value) or value.startswith("~"):
        return value
    by_config = os.path.join(os.path.dirname(os.path.abspath(source_path)), value)
    if os.path.exists(by_config):
        return os.path.normpath(by_config)
    if os.path.exists(value):
        logging.getLogger("gspo").info("%s: %r is not next to the config file (%s); using the current "
                                       "directory's %s", key, value, os.path.dirname(by_config),
                                       os.path.abspath(value))
    return value


def resolve_relative_paths(cfg: Config) -> Config:
    """Apply `resolve_input_path` to every input path of a config read from `cfg.source_path` (in place)."""
    src = cfg.source_path
    if cfg.data.path is not None:
        cfg.data.path = resolve_input_path(cfg.data.path, src, "data.path")
    if cfg.rejection.mix_path is not None:
        cfg.rejection.mix_path = resolve_input_path(cfg.rejection.mix_path, src, "rejection.mix_path")
    if not cfg.model.name_or_path.startswith("tiny:"):
        cfg.model.name_or_path = resolve_input_path(cfg.model.name_or_path, src, "model.name_or_path")
    if cfg.resume_from not in (None, "latest"):
        cfg.resume_from = resolve_input_path(cfg.resume_from, src, "resume_from")
    if cfg.train.eval_config is not None:
        cfg.train.eval_config = resolve_input_path(cfg.train.eval_config, src, "train.eval_config")
    for i, r in enumerate(cfg.rewards):
        if isinstance(r.kwargs.get("model_path"), str):
            r.kwargs["model_path"] = resolve_input_path(r.kwargs["model_path"], src, f"rewards.{i}.kwargs.model_path")
    return cfg
