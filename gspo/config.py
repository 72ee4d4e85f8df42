"""Typed run configuration: one YAML file per stage, `key.sub=value` overrides, validation.

A config is a `Config`: a few top-level keys plus one section per concern (model, data, rollout, algorithm,
optim, train, moe, lora, sft, logging) and a list of `rewards`. Every field is documented once, next to its
definition (`metadata["help"]`); `docs/config.md` is generated from these definitions
(`gspo config-reference` or `python -m gspo.config --markdown`).

Precedence: field default < YAML file < command-line override. Overrides are `key.sub=value`, the value
parsed as YAML (`algorithm.clip_high=4e-4`, `lora.target_modules=[q_proj,v_proj]`, `model.tiny.num_experts=8`,
`rewards.0.weight=0.5`, `rewards=[synthetic_accuracy,synthetic_format]`).

Errors raise `ConfigError` (a ValueError) naming the dotted key: an unknown key names the closest valid key
and every valid key of its section; a wrong type names the expected type and what was given; a fixed-choice
field lists its choices. `load_config` checks keys, types and ranges; `Config.validate()` adds the checks that
span fields and resolves every registry name (loss, rollout engine, task, KL estimator, reward functions,
stage, tiny-model family). Nothing here loads a model.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
import sys
import types
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from gspo.registry import closest


class ConfigError(ValueError):
    """A config problem. `key` is the dotted key of the (first) offending field; `keys` lists all of them."""

    def __init__(self, message: str, key: str | None = None, keys: list[str] | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.keys = keys if keys is not None else ([key] if key else [])


# Stage names a config may name. A stage runs only when its runner is registered in `gspo.registry.STAGES`
# (`gspo train` says "not available yet" otherwise); registered names are valid too.
KNOWN_STAGES = ("rl", "sft", "rejection_sampling", "reward_model")

Dtype = Literal["float32", "bfloat16", "float16"]


def doc(help: str, *, required: bool = False, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None) -> dict[str, Any]:
    """A field's metadata: its one-place documentation, and bounds on numeric values (None is not bounded)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return {"help": help, "required": required, "bounds": bounds}


@dataclass
class ModelConfig:
    """The policy model (and the reference model when algorithm.beta > 0)."""

    name_or_path: str = field(default="", metadata=doc(
        "Hugging Face model id or local directory; `tiny:<family>` builds a tiny random MoE locally (e.g."
        " `tiny:qwen3_moe`; families are registered in `gspo.registry.MODEL_FAMILIES`).", required=True))
    tokenizer: str | None = field(default=None, metadata=doc(
        "Tokenizer id or directory; null = the model's own."))
    dtype: Dtype = field(default="float32", metadata=doc("Parameter dtype of the trained model."))
    experts_implementation: Literal["auto", "eager", "grouped_mm", "batched_mm"] = field(
        default="auto", metadata=doc(
        "transformers' MoE experts backend; `auto` = grouped_mm where it works, eager otherwise "
        "(grouped_mm trains ~9x faster than eager on an H100)."))
    attn_implementation: str = field(default="sdpa", metadata=doc(
        "transformers attention backend (`sdpa`, `eager`, ...)."))
    trust_remote_code: bool = field(default=False, metadata=doc(
        "Allow custom modelling code from the checkpoint."))
    gradient_checkpointing: bool = field(default=False, metadata=doc(
        "Recompute activations in backward to save memory."))
    tiny: dict[str, Any] = field(default_factory=dict, metadata=doc(
        "Overrides for the tiny-model factory (e.g. hidden_size, num_experts, num_hidden_layers); only "
        "with a `tiny:` model."))


@dataclass
class DataConfig:
    """Prompts. Exactly one of `task` and `path`."""

    task: str | None = field(default=None, metadata=doc(
        "A registered synthetic task (`gspo.registry.TASKS`), e.g. `add`."))
    path: str | None = field(default=None, metadata=doc(
        "A JSONL file or a Hugging Face dataset id (`org/name`). Every column reaches the reward "
        "functions as a keyword argument."))
    split: str = field(default="train", metadata=doc("Dataset split (Hugging Face datasets)."))
    prompt_column: str = field(default="prompt", metadata=doc(
        "Column holding the prompt (a string or chat messages)."))
    num_samples: int = field(default=2048, metadata=doc("Number of rows a synthetic task generates.", ge=1))
    shuffle: bool = field(default=True, metadata=doc("Shuffle the prompts every epoch (seeded by `seed`)."))
    task_kwargs: dict[str, Any] = field(default_factory=dict, metadata=doc(
        "Keyword arguments of the synthetic task."))


@dataclass
class RolloutConfig:
    """Sampling: B = prompts_per_step prompts, G = group_size completions each, N = B * G per rollout."""

    engine: str = field(default="vllm_colocate", metadata=doc(
        "Rollout engine (`gspo.registry.ROLLOUT_ENGINES`): `vllm_colocate` (in-process vLLM) or "
        "`hf_generate` (transformers generate)."))
    group_size: int = field(default=8, metadata=doc(
        "G: completions per prompt (group advantages need G >= 2).", ge=2))
    prompts_per_step: int = field(default=8, metadata=doc("B: prompts per rollout.", ge=1))
    max_new_tokens: int = field(default=64, metadata=doc("Longest completion, in tokens.", ge=1))
    temperature: float = field(default=1.0, metadata=doc("Sampling temperature.", gt=0))
    top_p: float = field(default=1.0, metadata=doc(
        "Nucleus sampling; values < 1 truncate the sampler and bias the importance ratios.", gt=0, le=1))
    top_k: int = field(default=-1, metadata=doc("Top-k sampling; -1 = off.", ge=-1))
    dtype: Dtype | None = field(default=None, metadata=doc(
        "Engine dtype; null = model.dtype. vLLM always gets an explicit dtype (its `auto` silently runs "
        "bf16 on CPU)."))
    gpu_memory_utilization: float = field(default=0.3, metadata=doc(
        "vLLM: fraction of GPU memory for weights + KV cache (the trainer shares the GPU).", gt=0, le=1))
    kv_cache_memory_bytes: int | None = field(default=None, metadata=doc(
        "vLLM: KV-cache size in bytes; overrides gpu_memory_utilization (needed on CPU).", ge=1))
    max_model_len: int | None = field(default=None, metadata=doc(
        "Engine context length; null = longest prompt + max_new_tokens + a margin.", ge=1))
    enforce_eager: bool = field(default=True, metadata=doc(
        "vLLM: no CUDA graphs / compilation (faster start-up)."))
    old_logp_source: Literal["trainer", "engine"] = field(default="trainer", metadata=doc(
        "pi_old log-probs: `trainer` recomputes them with a forward pass; `engine` uses the sampler's "
        "log-probs (skips that pass; GSPO's sequence ratio tolerates small precision gaps)."))
    sleep_between_rollouts: bool = field(default=False, metadata=doc(
        "Release engine memory between rollouts (vLLM sleep mode; not supported on CPU)."))


@dataclass
class AlgorithmConfig:
    """The policy loss and how each rollout is used."""

    name: str = field(default="gspo", metadata=doc(
        "Loss (`gspo.registry.LOSSES`): gspo, gspo_token, grpo, dr_grpo, dapo. The name fixes the ratio "
        "level (sequence / token) and the aggregation."))
    clip_low: float | None = field(default=None, metadata=doc(
        "Lower clip: ratios below 1 - clip_low are clipped (negative advantages); null = the algorithm's "
        "default (GSPO paper 5.1: 3e-4; GRPO: 0.2).", ge=0, lt=1))
    clip_high: float | None = field(default=None, metadata=doc(
        "Upper clip: ratios above 1 + clip_high are clipped (positive advantages); null = the algorithm's"
        " default (GSPO paper 5.1: 4e-4; GRPO: 0.2; DAPO: 0.28).", ge=0))
    allow_wide_clip: bool = field(default=False, metadata=doc(
        "Allow a clip >= 0.01 with a sequence-level algorithm (normally a mistake: sequence ratios sit "
        "much closer to 1 than token ratios)."))
    num_minibatches: int = field(default=4, metadata=doc(
        "Optimizer steps per rollout per epoch (GSPO paper 5.1: 4). With 1 minibatch and 1 epoch the "
        "ratio is exactly 1 and clipping never fires.", ge=1))
    num_epochs: int = field(default=1, metadata=doc("Passes over each rollout.", ge=1))
    beta: float = field(default=0.0, metadata=doc(
        "KL penalty weight against the reference model (paper: 0).", ge=0))
    kl_estimator: str = field(default="k3", metadata=doc(
        "KL estimator (`gspo.registry.KL_ESTIMATORS`); used when beta > 0."))
    max_log_ratio: float = field(default=10.0, metadata=doc(
        "Bound on |log ratio| before exponentiating, so one sequence cannot turn the batch into NaN.", gt=0))


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = field(default=1e-6, metadata=doc(
        "Peak learning rate (public GSPO recipes: 1e-6 full, 1e-5 LoRA).", gt=0))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay.", ge=0))
    adam_beta1: float = field(default=0.9, metadata=doc("AdamW beta1.", ge=0, lt=1))
    adam_beta2: float = field(default=0.999, metadata=doc("AdamW beta2.", ge=0, lt=1))
    adam_eps: float = field(default=1e-8, metadata=doc("AdamW epsilon.", gt=0))
    max_grad_norm: float = field(default=1.0, metadata=doc("Gradient-norm clip per optimizer step.", gt=0))
    warmup_steps: int = field(default=0, metadata=doc("Linear warm-up, in optimizer steps.", ge=0))
    scheduler: Literal["constant", "linear", "cosine"] = field(default="constant", metadata=doc(
        "Schedule after warm-up."))


@dataclass
class TrainConfig:
    """Length of an RL run and its checkpoints."""

    num_rollouts: int = field(default=100, metadata=doc(
        "RL iterations. Optimizer steps = num_rollouts x algorithm.num_minibatches x "
        "algorithm.num_epochs.", ge=1))
    save_every: int = field(default=0, metadata=doc(
        "Checkpoint every this many rollouts; 0 = only at the end.", ge=0))
    keep_checkpoints: int = field(default=2, metadata=doc("Newest checkpoints kept on disk.", ge=1))


@dataclass
class MoEConfig:
    """Mixture-of-Experts options."""

    aux_loss_coef: float = field(default=0.0, metadata=doc(
        "Router load-balancing loss weight; 0 = off.", ge=0))
    router_z_loss_coef: float = field(default=0.0, metadata=doc("Router z-loss weight; 0 = off.", ge=0))
    freeze_router: bool = field(default=False, metadata=doc("Keep router weights fixed."))
    router_fp32: bool = field(default=False, metadata=doc("Compute router logits in float32."))
    metrics: bool = field(default=True, metadata=doc(
        "Log per-expert load, collapse and routing drift (`moe/*`)."))
    collapse_threshold: float = field(default=4.0, metadata=doc(
        "Flag a layer whose max/mean expert load exceeds this.", gt=1))
    dead_expert_window: int = field(default=10, metadata=doc(
        "Rollouts without a token before an expert counts as dead.", ge=1))
    routing_replay: Literal["none", "r2", "r3"] = field(default="none", metadata=doc(
        "Routing Replay: `r2` replays pi_old's experts in the trainer; `r3` replays the engine's experts."))


@dataclass
class LoRAConfig:
    """LoRA adapters (peft)."""

    enabled: bool = field(default=False, metadata=doc("Train LoRA adapters instead of all weights."))
    r: int = field(default=16, metadata=doc("Adapter rank.", ge=1))
    alpha: int = field(default=32, metadata=doc("LoRA alpha (scale = alpha / r).", ge=1))
    dropout: float = field(default=0.0, metadata=doc("Adapter dropout.", ge=0, lt=1))
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      metadata=doc(
        "Linear modules that get adapters."))
    target_parameters: list[str] = field(default_factory=list, metadata=doc(
        "3-D expert parameters that get adapters (peft `target_parameters`, e.g. "
        "`mlp.experts.gate_up_proj`)."))
    sync: Literal["merge", "adapter"] = field(default="merge", metadata=doc(
        "Weight sync to the engine: `merge` sends merged full weights; `adapter` sends only the adapter."))


@dataclass
class SFTConfig:
    """The `sft` stage (TRL SFTTrainer)."""

    num_epochs: float = field(default=1.0, metadata=doc("Epochs over the SFT data.", gt=0))
    max_steps: int = field(default=-1, metadata=doc(
        "Stop after this many optimizer steps; -1 = num_epochs decides.", ge=-1))
    batch_size: int = field(default=8, metadata=doc("Examples per device per optimizer step.", ge=1))
    max_length: int | None = field(default=1024, metadata=doc(
        "Truncate examples to this many tokens; null = no limit.", ge=1))
    packing: bool = field(default=False, metadata=doc("Pack several examples into one sequence."))
    completion_only_loss: bool = field(default=True, metadata=doc(
        "Loss on completion tokens only (not the prompt)."))


@dataclass
class RewardSpec:
    """One reward function. In YAML a bare string is shorthand for `{fn: <string>}`."""

    fn: str = field(default="", metadata=doc(
        "A registered reward name, `package.module:function` or `path/to/file.py:function` (relative to "
        "the current directory, then to the config file).", required=True))
    weight: float = field(default=1.0, metadata=doc("Weight in the summed reward."))
    on_error: Literal["error", "zero", "skip"] = field(default="error", metadata=doc(
        "When a call raises, times out or returns NaN / a wrong length: `error` stops the run, `zero` "
        "scores the affected samples 0, `skip` leaves them out of this reward (counted in "
        "`rewards/<name>/errors`)."))
    timeout_s: float | None = field(default=None, metadata=doc(
        "Per-call time limit in seconds; null = none.", gt=0))
    kwargs: dict[str, Any] = field(default_factory=dict, metadata=doc(
        "Extra keyword arguments for the function."))
    name: str | None = field(default=None, metadata=doc(
        "Name in the logs (`rewards/<name>/mean`); null = derived from fn."))


@dataclass
class LoggingConfig:
    """Metrics, samples and trackers. metrics.jsonl is always written."""

    log_every: int = field(default=1, metadata=doc("Log metrics every this many optimizer steps.", ge=1))
    sample_every: int = field(default=10, metadata=doc(
        "Log a table of completions every this many rollouts; 0 = never.", ge=0))
    num_samples: int = field(default=4, metadata=doc("Completions per sample table.", ge=0))
    trackers: list[Literal["tensorboard", "trackio", "wandb"]] = field(default_factory=list, metadata=doc(
        "Experiment trackers besides metrics.jsonl."))
    progress: bool = field(default=True, metadata=doc("Show a progress bar."))
    project: str = field(default="gspo", metadata=doc("Tracker project name."))


@dataclass
class Config:
    """A whole run: top-level keys, one section per concern, the reward functions."""

    stage: str = field(default="rl", metadata=doc(
        f"What `gspo train` runs: {', '.join(KNOWN_STAGES)} (or any stage registered in "
        "`gspo.registry.STAGES`)."))
    seed: int = field(default=0, metadata=doc("Seed for sampling, shuffling, initialization."))
    output_dir: str = field(default="runs/gspo", metadata=doc(
        "Checkpoints, metrics.jsonl, the resolved config."))
    resume_from: str | None = field(default=None, metadata=doc(
        "`latest` = the newest checkpoint in output_dir, or a checkpoint directory; null = start fresh."))
    plugins: list[str] = field(default_factory=list, metadata=doc(
        "Modules imported before validation, so their registrations (tasks, losses, rewards, engines, "
        "stages) are available by name."))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=doc(ModelConfig.__doc__))
    data: DataConfig = field(default_factory=DataConfig, metadata=doc(DataConfig.__doc__))
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata=doc(RolloutConfig.__doc__))
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig, metadata=doc(AlgorithmConfig.__doc__))
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=doc(OptimConfig.__doc__))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=doc(TrainConfig.__doc__))
    moe: MoEConfig = field(default_factory=MoEConfig, metadata=doc(MoEConfig.__doc__))
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata=doc(LoRAConfig.__doc__))
    sft: SFTConfig = field(default_factory=SFTConfig, metadata=doc(SFTConfig.__doc__))
    rewards: list[RewardSpec] = field(default_factory=list, metadata=doc(
        "Reward functions, summed with their weights (at least one for stage `rl`)."))
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=doc(LoggingConfig.__doc__))
    # Where the config was read from (not a config key): relative reward files resolve against its folder.
    source_path: str | None = field(default=None, compare=False, repr=False, metadata={"internal": True})

    # -- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """Build from a nested dict (as read from YAML) and `key.sub=value` overrides; checks keys, types."""
        data = apply_overrides(data, overrides)
        errors: list[ConfigError] = []
        cfg = _build(cls, data, "", errors)
        _raise(errors)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every key (YAML-safe); `Config.from_dict(cfg.to_dict()) == cfg`."""
        return _to_plain(self)

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
    return cfg.validate() if validate else cfg


# ----------------------------------------------------------------------------------------------------------
# Checks that span fields, and registry names
# ----------------------------------------------------------------------------------------------------------

# A data.path that names a local file (an HF dataset id looks like "org/name").
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")
# Clip values from this size up are GRPO's order of magnitude (0.2); sequence ratios need ~1e-4 (GSPO 5.1).
WIDE_CLIP = 0.01


def _looks_local(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~")) or path.lower().endswith(_FILE_SUFFIXES)
            or os.path.exists(os.path.expanduser(path)))


def _resolve(registry: Any, name: str, key: str, errors: list[ConfigError]) -> Any:
    if name not in registry:
        errors.append(ConfigError(f"{key}: {registry.unknown_message(name)}", key))
        return None
    return registry.get(name)


def check_config(cfg: Config) -> list[ConfigError]:
    """Every rule that spans fields or needs a registry; returns the problems (empty = valid)."""
    errors: list[ConfigError] = []

    def err(key: str, msg: str) -> None:
        errors.append(ConfigError(f"{key}: {msg}", key))

    r, a, m, d = cfg.rollout, cfg.algorithm, cfg.model, cfg.data
    n, k = cfg.completions_per_rollout, a.num_minibatches
    if n % k:
        err("algorithm.num_minibatches", "rollout.prompts_per_step * rollout.group_size = "
            f"{r.prompts_per_step} * {r.group_size} = {n} completions do not split into {k} equal "
            "minibatches; choose algorithm.num_minibatches among the divisors of that product")
    if r.group_size < 2:
        err("rollout.group_size", f"must be >= 2 (group advantages compare completions of one prompt), got "
            f"{r.group_size}")
    for name in ("clip_low", "clip_high"):
        v = getattr(a, name)
        if v is not None and v < 0:
            err(f"algorithm.{name}", f"must be >= 0, got {v}")
    if cfg.lora.target_parameters and not cfg.lora.enabled:
        err("lora.target_parameters", "is set but lora.enabled is false; set lora.enabled: true or remove it")
    is_tiny = m.name_or_path.startswith("tiny:")
    if m.tiny and not is_tiny:
        err("model.tiny", f"only applies to a `tiny:<family>` model, not {m.name_or_path!r}")
    if (d.task is None) == (d.path is None):
        err("data.task" if d.task is None else "data.path", "set exactly one of data.task (a synthetic task) "
            f"and data.path (a JSONL file or dataset id); got task={d.task!r}, path={d.path!r}")
    if d.path is not None and _looks_local(d.path) and not os.path.exists(os.path.expanduser(d.path)):
        err("data.path", f"local file {d.path!r} does not exist (cwd: {os.getcwd()})")
    if cfg.resume_from not in (None, "latest") and not os.path.isdir(cfg.resume_from):
        err("resume_from", f"checkpoint directory {cfg.resume_from!r} does not exist (or use `latest`)")
    if cfg.stage == "rl" and not cfg.rewards:
        err("rewards", "stage `rl` needs at least one reward function, e.g. `rewards: [synthetic_accuracy]`")
    names = [s.name for s in cfg.rewards if s.name]
    for dup in sorted({x for x in names if names.count(x) > 1}):
        err("rewards", f"two rewards are named {dup!r}; names must be unique (they key the logged metrics)")

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
    stages = sorted(set(KNOWN_STAGES) | set(registry.STAGES.names()))
    if cfg.stage not in stages:
        hint = closest(cfg.stage, stages)
        err("stage", f"unknown stage {cfg.stage!r}; valid: {', '.join(stages)}"
            + (f" (did you mean {hint!r}?)" if hint else ""))
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
    task = _resolve(registry.TASKS, d.task, "data.task", errors) if d.task is not None else None
    if task is not None:
        try:
            inspect.signature(task).bind(**d.task_kwargs)
        except TypeError as e:
            params = [p for p in inspect.signature(task).parameters if p != "self"]
            err("data.task_kwargs", f"task {d.task!r} does not take these arguments ({e}); it takes: "
                f"{', '.join(params) or 'none'}")
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


# ----------------------------------------------------------------------------------------------------------
# YAML and overrides
# ----------------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML silently keeps the last)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise ConfigError(f"key {key!r} appears twice in one mapping (line {line})", str(key))
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", e.key) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


# List items that may be written as a bare string, and the key the string stands for.
_SHORTHAND = {"rewards": "fn"}
_SHORTHAND_FIELD: dict[type, str] = {RewardSpec: "fn"}


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` set (value parsed as YAML; list items by index)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not key=value (e.g. algorithm.clip_high=4e-4)",
                              key or None)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}", key) from None
        _set_path(data, key, value)
    return data


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            i = _index(node, part, key, ".".join(parts[:depth]))
            if last:
                node[i] = value
                return
            node[i] = _expand(node[i], parts[depth - 1])
            node = node[i]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[:depth])!r} is not a mapping "
                              f"(it holds {_describe(node)})", key)


def _index(items: list[Any], part: str, key: str, list_key: str) -> int:
    if not re.fullmatch(r"-?\d+", part) or not -len(items) <= int(part) < len(items):
        raise ConfigError(f"cannot set {key!r}: {part!r} is not an index of {list_key!r} ({len(items)} "
                          f"item(s)); set the whole list with {list_key}=[...]", key)
    return int(part)


def _expand(item: Any, list_name: str) -> Any:
    """A bare-string list item about to receive a sub-key becomes its mapping form (`fn: <string>`)."""
    if isinstance(item, str) and list_name in _SHORTHAND:
        return {_SHORTHAND[list_name]: item}
    return item


# ----------------------------------------------------------------------------------------------------------
# Building sections with type checks
# ----------------------------------------------------------------------------------------------------------


def _raise(errors: list[ConfigError]) -> None:
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    lines = "\n".join(f"  - {e}" for e in errors)
    keys = [k for e in errors for k in e.keys]
    raise ConfigError(f"{len(errors)} config errors:\n{lines}", errors[0].key, keys)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls, globalns=vars(sys.modules[__name__]))
    return _HINTS[cls]


def public_fields(cls: type) -> list[Any]:
    return [f for f in fields(cls) if not f.metadata.get("internal")]


def _build(cls: type, data: Any, prefix: str, errors: list[ConfigError]) -> Any:
    """Instantiate dataclass `cls` from `data`, appending every problem to `errors` (defaults stand in)."""
    where = f"section {prefix!r}" if prefix else "the top level"
    if not isinstance(data, dict):
        errors.append(ConfigError(f"{prefix or 'config'}: expected a mapping of the keys of {where}, got "
                                  f"{_describe(data)}", prefix or None))
        return cls()
    known = {f.name: f for f in public_fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in known:
            hint = closest(str(name), list(known))
            msg = f"unknown key {key!r}"
            if hint:
                msg += f" (did you mean {(prefix + '.' if prefix else '') + hint!r}?)"
            errors.append(ConfigError(f"{msg}; valid keys in {where}: {', '.join(known)}", key))
            continue
        try:
            kwargs[name] = _check_bounds(_coerce(value, _hints(cls)[name], key, errors), known[name], key)
        except ConfigError as e:
            errors.append(e)
    for name, f in known.items():
        tp = _hints(cls)[name]
        if name not in data and is_dataclass(tp):  # an absent section still has required keys
            kwargs[name] = _build(tp, {}, f"{prefix}.{name}" if prefix else name, errors)
        if f.metadata.get("required") and not kwargs.get(name):
            key = f"{prefix}.{name}" if prefix else name
            if not any(e.key == key for e in errors):
                errors.append(ConfigError(f"{key} is required: {f.metadata['help']}", key))
    return cls(**kwargs)


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NULL_WORDS = ("null", "none", "None", "~")


def _describe(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def type_name(tp: Any) -> str:
    """Human-readable type, as in the errors and the reference doc."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(f'"{a}"' for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is dict or tp is dict:
        return "dict"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, errors: list[ConfigError]) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    bad = ConfigError(f"{key}: expected {type_name(tp)}, got {_describe(value)}", key)
    if origin in (Union, types.UnionType):  # always `X | None` here
        inner = next(a for a in args if a is not type(None))
        if value is None or (isinstance(value, str) and value in _NULL_WORDS and inner is not str):
            return None
        return _coerce(value, inner, key, errors)
    if value is None:
        raise bad
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        hint = closest(str(value), [str(a) for a in args])
        raise ConfigError(f"{key}: {value!r} is not one of: {', '.join(map(str, args))}"
                          + (f" (did you mean {hint!r}?)" if hint else ""), key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):  # "4e9" (PyYAML reads it as a string)
            number = float(value)
            if number.is_integer():
                return int(value) if re.fullmatch(r"[+-]?\d+", value.strip()) else int(number)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        # YAML 1.1 (PyYAML) reads 1e-6 as a string: accept numeric strings.
        numeric_text = isinstance(value, str) and _NUMBER.fullmatch(value.strip())
        if not isinstance(value, (int, float)) and not numeric_text:
            raise bad
        number = float(value)
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite float, got {value!r}", key)
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected str, got {_describe(value)} (quote it in YAML to pass text)", key)
    if origin is dict or tp is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise bad
    if origin is list:
        if isinstance(value, str) and not is_dataclass(args[0]):
            value = [value]  # `logging.trackers=wandb` means [wandb]
        if not isinstance(value, list):
            raise bad
        out = []
        for i, item in enumerate(value):
            try:
                out.append(_coerce(item, args[0], f"{key}.{i}", errors))
            except ConfigError as e:
                errors.append(e)
        return out
    if is_dataclass(tp):
        if isinstance(value, str) and tp in _SHORTHAND_FIELD:
            value = {_SHORTHAND_FIELD[tp]: value}
        return _build(tp, value, key, errors)
    raise bad  # a field type this module does not handle: a bug here, not in the config


def _check_bounds(value: Any, f: Any, key: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for op, limit in f.metadata.get("bounds", {}).items():
            ok = {"ge": value >= limit, "gt": value > limit, "le": value <= limit, "lt": value < limit}[op]
            if not ok:
                sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[op]
                raise ConfigError(f"{key}: must be {sign} {limit}, got {value!r}", key)
    return value


def _to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in public_fields(type(obj))}
    if isinstance(obj, list | tuple):
        return [_to_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


if __name__ == "__main__":  # python -m gspo.config --markdown > docs/config.md
    from gspo.cli import main

    raise SystemExit(main(["config-reference", *sys.argv[1:]]))
