"""Typed run configuration: one YAML file per stage, `key.sub=value` overrides, validation.

A config is a `Config`: a few top-level keys plus one section per concern (model, data, rollout, algorithm,
optim, train, moe, lora, sft, logging) and a list of `rewards`. Every field is documented once, next to its
definition (`field(default, help)`); `docs/config.md` is generated from these definitions
(`gspo config-reference`).

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

import inspect
import logging
import os
from typing import Any, Literal

import yaml
from pydantic import PrivateAttr

from gspo.config.parse import (
    SHORTHAND_FIELD,
    ConfigError,
    Section,
    _raise,
    apply_overrides,
    build,
    field,
    read_yaml,
    section,
)
from gspo.registry import closest
from gspo.rewards import DEFAULT_REWARD_TIMEOUT_S

Dtype = Literal["float32", "bfloat16", "float16"]


class ModelConfig(Section):
    """The policy model (and the reference model when algorithm.beta > 0)."""

    name_or_path: str = field("",
        "Hugging Face model id or local directory; `tiny:<family>` builds a tiny random MoE locally (e.g."
        " `tiny:qwen3_moe`; families are registered in `gspo.registry.MODEL_FAMILIES`).", required=True)
    tokenizer: str | None = field(None, "Tokenizer id or directory; null = the model's own.")
    dtype: Dtype = field("float32", "Parameter dtype of the trained model.")
    experts_implementation: Literal["auto", "eager", "grouped_mm", "batched_mm"] = field("auto",
        "transformers' MoE experts backend; `auto` = grouped_mm where it works, eager otherwise "
        "(grouped_mm trains ~9x faster than eager on an H100).")
    attn_implementation: str | None = field(None,
        "transformers attention backend (`sdpa`, `eager`, ...); null = transformers' default for the "
        "architecture (GPT-OSS, for one, has no `sdpa`).")
    trust_remote_code: bool = field(False, "Allow custom modelling code from the checkpoint.")
    gradient_checkpointing: bool = field(False, "Recompute activations in backward to save memory.")
    tiny: dict[str, Any] = field({},
        "Overrides for the tiny-model factory (e.g. hidden_size, num_experts, num_hidden_layers); only "
        "with a `tiny:` model.")


class DataConfig(Section):
    """Prompts. Exactly one of `task` and `path`."""

    task: str | None = field(None, "A registered synthetic task (`gspo.registry.TASKS`), e.g. `add`.")
    path: str | None = field(None,
        "A JSONL file or a Hugging Face dataset id (`org/name`). Every column reaches the reward "
        "functions as a keyword argument.")
    name: str | None = field(None,
        "Hugging Face dataset configuration name (`datasets.load_dataset(path, name)`, e.g. `main` for "
        "`openai/gsm8k`); null = the dataset's default.")
    split: str = field("train", "Dataset split (Hugging Face datasets).")
    revision: str | None = field(None,
        "Hugging Face dataset revision: a branch, tag or commit hash (pin one for reproducible runs); "
        "null = the default branch.")
    prompt_column: str = field("prompt", "Column holding the prompt (a string or chat messages).")
    chat_template: Literal["auto", "always", "never"] = field("auto",
        "How prompts are rendered for sampling: `auto` follows TRL's dataset formats (plain strings are used "
        "as they are, conversational prompts get the tokenizer's chat template); `always` wraps a string as "
        "one user turn in the template (for chat models fine-tuned on such turns); `never` uses plain text "
        "only. The choice and one rendered prompt are logged at start.")
    num_samples: int = field(2048, "Number of rows a synthetic task generates.", ge=1)
    shuffle: bool = field(True, "Shuffle the prompts every epoch (seeded by `seed`).")
    task_kwargs: dict[str, Any] = field({}, "Keyword arguments of the synthetic task.")

    def check(self) -> list[tuple[str, str]]:
        out = []
        if (self.task is None) == (self.path is None):
            out.append(("task" if self.task is None else "path", ("set exactly one of data.task (a synthetic task) "
                        f"and data.path (a JSONL file or dataset id); got task={self.task!r}, path={self.path!r}")))
        if self.path is not None and _looks_local(self.path) and not os.path.exists(os.path.expanduser(self.path)):
            out.append(("path", f"local file {self.path!r} does not exist (cwd: {os.getcwd()})"))
        return out


class RolloutConfig(Section):
    """Sampling: B = prompts_per_step prompts, G = group_size completions each, N = B * G per rollout."""

    engine: str = field("vllm_colocate",
        "Rollout engine (`gspo.registry.ROLLOUT_ENGINES`): `vllm_colocate` (in-process vLLM), "
        "`vllm_server` (vLLM in its own process, over HTTP: docs/rollout.md) or `hf_generate` (transformers "
        "generate).")
    group_size: int = field(8, "G: completions per prompt (group advantages need G >= 2).", ge=2)
    prompts_per_step: int = field(8, "B: prompts per rollout.", ge=1)
    max_new_tokens: int = field(64, "Longest completion, in tokens.", ge=1)
    temperature: float = field(1.0, "Sampling temperature.", gt=0)
    top_p: float = field(1.0,
        "Nucleus sampling; 1 = off. pi_old and pi_theta are both the truncated, renormalised sampler "
        "distribution (docs/concepts.md), so the on-policy ratio stays 1.", gt=0, le=1)
    top_k: int = field(-1, "Top-k sampling; -1 = off. Truncates pi_old and pi_theta like top_p.", ge=-1)
    dtype: Dtype | None = field(None,
        "Engine dtype; null = model.dtype. vLLM always gets an explicit dtype (its `auto` silently runs "
        "bf16 on CPU).")
    gpu_memory_utilization: float | None = field(None,
        "vLLM: fraction of GPU memory for weights + KV cache (the trainer shares the GPU); null = sized from "
        "the run: the weights plus the KV cache of prompts_per_step x group_size sequences of max_model_len "
        "tokens (`gspo.rollout.sizing`).", gt=0, le=1)
    kv_cache_memory_bytes: int | None = field(None,
        "vLLM: KV-cache size in bytes; overrides gpu_memory_utilization; null = sized from the run.", ge=1)
    max_model_len: int | None = field(None,
        "Engine context length; null = longest prompt + max_new_tokens + a margin.", ge=1)
    enforce_eager: bool | None = field(None,
        "vLLM: no CUDA graphs / compilation (faster start-up, slower decode); null = eager on CPU, CUDA "
        "graphs on GPU.")
    old_logp_source: Literal["trainer", "engine"] = field("trainer",
        "pi_old log-probs: `trainer` recomputes them with a forward pass; `engine` uses the sampler's "
        "log-probs (skips that pass; GSPO's sequence ratio tolerates small precision gaps). Both are the "
        "sampler's distribution after temperature, top-k and top-p.")
    sleep_between_rollouts: bool = field(False,
        "Release engine memory between rollouts (vLLM sleep mode; not supported on CPU).")
    max_staleness: int = field(0,
        "Asynchronous rollouts: 0 = generate, then train (synchronous); 1 = the next rollout is generated "
        "while the current one trains, with weights one update old (needs rollout.engine=vllm_server).",
        ge=0, le=1)
    server_url: str | None = field(None,
        "vllm_server: URL of a running `gspo serve CONFIG` (e.g. http://127.0.0.1:8000); null = start one "
        "(rollout.server_launch).")
    server_launch: bool = field(False,
        "vllm_server: `gspo train` starts the server on this host (and stops it at the end).")
    server_port: int = field(0, "vllm_server: port of a started server; 0 = any free port.", ge=0, le=65535)
    server_timeout: float = field(600.0,
        "vllm_server: seconds one request (a rollout, a weight push) may take before the run stops with a "
        "checkpoint.", gt=0)
    server_start_timeout: float = field(900.0, "vllm_server: seconds a started server may take to load.", gt=0)
    hf_batch_prompts: int = field(0,
        "hf_generate: prompts per generate call; 0 = all of a process's prompts in one call. One sampler "
        "draws for a whole call, so only 1 (each prompt its own seeded call, as vLLM samples) gives a "
        "multi-process run the completions of a one-process run.", ge=0)


class AlgorithmConfig(Section):
    """The policy loss and how each rollout is used."""

    name: str = field("gspo",
        "Loss (`gspo.registry.LOSSES`): gspo, gspo_token, grpo, dr_grpo, dapo. The name fixes the ratio "
        "level (sequence / token) and the aggregation.")
    clip_low: float | None = field(None,
        "Lower clip: ratios below 1 - clip_low are clipped (negative advantages); null = the algorithm's "
        "default (GSPO paper 5.1: 3e-4; GRPO: 0.2).", ge=0, lt=1)
    clip_high: float | None = field(None,
        "Upper clip: ratios above 1 + clip_high are clipped (positive advantages); null = the algorithm's"
        " default (GSPO paper 5.1: 4e-4; GRPO: 0.2; DAPO: 0.28).", ge=0)
    allow_wide_clip: bool = field(False,
        "Allow a clip >= 0.01 with a sequence-level algorithm (normally a mistake: sequence ratios sit "
        "much closer to 1 than token ratios).")
    num_minibatches: int = field(4,
        "Optimizer steps per rollout per epoch (GSPO paper 5.1: 4). With 1 minibatch and 1 epoch the "
        "ratio is exactly 1 and clipping never fires.", ge=1)
    num_epochs: int = field(1, "Passes over each rollout.", ge=1)
    beta: float = field(0.0, "KL penalty weight against the reference model (paper: 0).", ge=0)
    kl_estimator: str = field("k3", "KL estimator (`gspo.registry.KL_ESTIMATORS`); used when beta > 0.")
    adv_eps: float = field(1e-4,
        "Added to the group's reward std before dividing (GSPO Eq. 6); 1e-4 is TRL GRPOTrainer's constant, "
        "so advantages equal TRL's for the same rewards.", gt=0)
    tis_cap: float | None = field(None,
        "Truncated importance sampling against the engine's sampler mu: each sequence's advantage is weighted "
        "by min(exp(s_i), tis_cap), s_i = mean_t(log pi_old - log mu) (docs/rollout.md); null = off. Needs the "
        "engine's logprobs and rollout.old_logp_source=trainer.", gt=0)
    tis_mask_bound: float | None = field(None,
        "Drop (zero the advantage of) sequences with |s_i| > this bound (docs/rollout.md); null = off.", ge=0)
    max_log_ratio: float = field(10.0,
        "Bound on |log ratio| before exponentiating, so one sequence cannot turn the batch into NaN.", gt=0)


class OptimConfig(Section):
    """AdamW and the learning-rate schedule."""

    lr: float = field(1e-6, "Peak learning rate (public GSPO recipes: 1e-6 full, 1e-5 LoRA).", gt=0)
    weight_decay: float = field(0.0, "AdamW weight decay.", ge=0)
    adam_beta1: float = field(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = field(0.999, "AdamW beta2.", ge=0, lt=1)
    adam_eps: float = field(1e-8, "AdamW epsilon.", gt=0)
    max_grad_norm: float = field(1.0, "Gradient-norm clip per optimizer step.", gt=0)
    warmup_steps: int = field(0, "Linear warm-up, in optimizer steps.", ge=0)
    scheduler: Literal["constant", "linear", "cosine"] = field("constant", "Schedule after warm-up.")


class TrainConfig(Section):
    """Length of an RL run and its checkpoints."""

    num_rollouts: int = field(100,
        "RL iterations. Optimizer steps = num_rollouts x algorithm.num_minibatches x "
        "algorithm.num_epochs.", ge=1)
    save_every: int = field(0, "Checkpoint every this many rollouts; 0 = only at the end.", ge=0)
    keep_checkpoints: int = field(2, "Newest checkpoints kept on disk.", ge=1)
    eval_every: int = field(0,
        "Evaluate the policy every this many rollouts during RL, with the rollout engine (pass@k and mean "
        "rewards, logged as `eval/*` in metrics.jsonl, plotted in the pipeline report); 0 = off.", ge=0)
    eval_config: str | None = field(None,
        "Config file whose `data`, `rewards`, `eval` and `rollout` sampling settings that evaluation uses "
        "(e.g. recipes/tiny/eval.yaml; relative to this config's folder); null = this config's own (`eval.seed` "
        "makes a synthetic task draw other prompts than training).")
    fsdp_param_dtype: Dtype | None = field(None,
        "Several processes (FSDP2): the compute dtype the parameter shards are gathered in, e.g. bfloat16 with "
        "model.dtype float32 (fp32 master weights and optimizer state, the standard mixed-precision recipe); "
        "null = the parameters' own. Gradients are reduced in float32 either way. Activation checkpointing: "
        "model.gradient_checkpointing.")
    fsdp_cpu_offload: bool = field(False,
        "Several processes (FSDP2): keep parameter shards, gradients and optimizer state in CPU memory "
        "(CPUOffloadPolicy; the optimizer steps on the CPU), gathering each layer to the GPU when it runs.")

    def check(self) -> list[tuple[str, str]]:
        if self.eval_config is not None and not os.path.isfile(os.path.expanduser(self.eval_config)):
            return [("eval_config", f"file {self.eval_config!r} does not exist (cwd: {os.getcwd()})")]
        return []


class MoEConfig(Section):
    """Mixture-of-Experts options."""

    aux_loss_coef: float = field(0.0, "Router load-balancing loss weight; 0 = off.", ge=0)
    router_z_loss_coef: float = field(0.0, "Router z-loss weight; 0 = off.", ge=0)
    freeze_router: bool = field(False, "Keep router weights fixed.")
    router_fp32: bool = field(False, "Compute router logits in float32.")
    metrics: bool = field(True, "Log per-expert load, collapse and routing drift (`moe/*`).")
    collapse_threshold: float = field(4.0, "Flag a layer whose max/mean expert load exceeds this.", gt=1)
    dead_expert_window: int = field(10, "Rollouts without a token before an expert counts as dead.", ge=1)
    routing_replay: Literal["none", "r2", "r3"] = field("none",
        "Routing Replay: `r2` replays pi_old's experts in the trainer; `r3` (replay the engine's experts) is "
        "refused until an engine returns its routed experts (docs/moe.md).")

    def check(self) -> list[tuple[str, str]]:
        if self.routing_replay == "r3":
            return [("routing_replay", ("r3 replays the rollout engine's routed experts, and no engine here "
                     "returns them (vLLM 0.32 does only with its V2 model runner, GPU + Triton, not wired yet); "
                     "use r2"))]
        return []


class LoRAConfig(Section):
    """LoRA adapters (peft)."""

    enabled: bool = field(False, "Train LoRA adapters instead of all weights.")
    r: int = field(16, "Adapter rank.", ge=1)
    alpha: int = field(32, "LoRA alpha (scale = alpha / r).", ge=1)
    dropout: float = field(0.0, "Adapter dropout.", ge=0, lt=1)
    target_modules: list[str] = field(["q_proj", "k_proj", "v_proj", "o_proj"],
        "Linear modules that get adapters.")
    target_parameters: list[str] = field([],
        "3-D expert parameters that get adapters (peft `target_parameters`, e.g. "
        "`mlp.experts.gate_up_proj`).")
    sync: Literal["merge", "adapter"] = field("merge",
        "Weight sync to the engine: `merge` sends merged full weights; `adapter` sends only the adapter.")
    save: Literal["adapter", "merged", "both"] = field("both",
        "What checkpoints hold: the adapter (`adapter/`, needed to resume), the merged model (`model/`), or "
        "both. The stage's `final/` is always the merged model, `final_adapter/` the adapter.")

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.target_parameters and not self.enabled:
            out.append(("target_parameters", "is set but lora.enabled is false; set lora.enabled: true or remove it"))
        if self.enabled and self.target_parameters and self.dropout > 0:
            out.append(("dropout", ("must be 0 with lora.target_parameters (peft has no dropout for parameter "
                        "adapters)")))
        return out


class SFTConfig(Section):
    """The `sft` stage (TRL SFTTrainer)."""

    num_epochs: float = field(1.0, "Epochs over the SFT data.", gt=0)
    max_steps: int = field(-1, "Stop after this many optimizer steps; -1 = num_epochs decides.", ge=-1)
    batch_size: int = field(8, "Examples per device per optimizer step.", ge=1)
    max_length: int | None = field(1024, "Truncate examples to this many tokens; null = no limit.", ge=1)
    packing: bool = field(False, "Pack several examples into one sequence.")
    completion_only_loss: bool = field(True, "Loss on completion tokens only (not the prompt).")


class RejectionConfig(Section):
    """The `rejection_sampling` stage. Sampling follows the `rollout` section: k = rollout.group_size
    completions per prompt, rollout.prompts_per_step prompts per engine call, rollout.max_new_tokens,
    temperature, top_p, top_k; each completion is scored by `rewards` (weighted sum)."""

    num_prompts: int | None = field(None, "Prompts taken from the data (in order); null = all of them.", ge=1)
    min_reward: float | None = field(1.0,
        "Accept a completion when its summed reward is >= this; null = no threshold (then best_of must be "
        "set).")
    best_of: int = field(0,
        "Keep at most this many accepted completions per prompt, the highest-reward ones; 0 = all.", ge=0)
    dedup: bool = field(True,
        "Drop a completion whose text (whitespace-stripped) repeats an accepted one of the same prompt.")
    min_tokens: int = field(1,
        "Shortest accepted completion, in tokens of the model's tokenizer (EOS not counted).", ge=0)
    max_tokens: int | None = field(None, "Longest accepted completion, in tokens; null = no bound.", ge=1)
    drop_truncated: bool = field(True,
        "Reject completions cut off by rollout.max_new_tokens (finish reason `length`).")
    mix_path: str | None = field(None,
        "General SFT data mixed into the output (JSONL or HF dataset with prompt + completion, or "
        "messages); null = none.")
    mix_task: str | None = field(None,
        "A registered task whose reference completions (`sft_rows`) are the general data, instead of mix_path "
        "(e.g. `add`: answers without a think block, as DeepSeek-R1 stage 3 mixes in non-CoT data).")
    mix_task_kwargs: dict[str, Any] = field({}, "Keyword arguments of mix_task.")
    mix_ratio: float = field(0.0,
        "General rows added per accepted row (0.5 = one general row for every two accepted).", ge=0)

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            out.append(("max_tokens", f"{self.max_tokens} < rejection.min_tokens={self.min_tokens}"))
        if self.mix_ratio > 0 and (self.mix_path is None) == (self.mix_task is None):
            out.append(("mix_path", ("rejection.mix_ratio > 0 needs the general SFT data: set exactly one of "
                        "rejection.mix_path and rejection.mix_task (got mix_path="
                        f"{self.mix_path!r}, mix_task={self.mix_task!r})")))
        if self.mix_path and _looks_local(self.mix_path) and not os.path.exists(os.path.expanduser(self.mix_path)):
            out.append(("mix_path", f"local file {self.mix_path!r} does not exist (cwd: {os.getcwd()})"))
        return out


class RewardModelConfig(Section):
    """The `reward_model` stage (TRL RewardTrainer). Pairs come from `data`: a task with preference_rows()
    (e.g. `add_concise`) or a JSONL / HF dataset with prompt, chosen, rejected columns. The model starts from
    model.name_or_path: `tiny:<family>` builds a tiny sequence-classification model (num_labels=1) from
    that family's config, a local causal-LM checkpoint gets a new scalar head."""

    num_epochs: float = field(1.0, "Epochs over the training pairs.", gt=0)
    max_steps: int = field(-1, "Stop after this many optimizer steps; -1 = num_epochs decides.", ge=-1)
    batch_size: int = field(16, "Pairs per optimizer step.", ge=1)
    max_length: int | None = field(512,
        "Pairs with a longer chosen or rejected text (tokens) are dropped; null = no limit.", ge=1)
    eval_fraction: float = field(0.1,
        "Share of the pairs held out to measure pairwise accuracy (chosen scored above rejected).",
        gt=0, lt=1)
    center_rewards_coefficient: float | None = field(None,
        "Pull scores toward mean zero (TRL; Eisenstein et al. 2023 Eq. 2 suggest 0.01); null = off.", ge=0)


class EvalConfig(Section):
    """`gspo eval` / `gspo.training.evaluation.run_eval`: n samples per prompt with the rollout engine (rollout
    section: engine, max_new_tokens, temperature, top_p, top_k), scored by `rewards`; writes eval.json."""

    num_samples: int = field(8, "n: samples per prompt.", ge=1)
    k: list[int] = field([1, 8],
        "pass@k values reported (each <= num_samples); unbiased estimator of Chen et al. 2021, Eq. 1.")
    num_prompts: int | None = field(64, "Prompts evaluated (the first ones of the data); null = all.", ge=1)
    pass_reward: str | None = field(None,
        "Name of the reward that decides whether a sample passes (as in `rewards/<name>/mean`); null = the "
        "first configured reward.")
    pass_threshold: float = field(1.0, "A sample passes when its pass_reward is >= this.")
    seed: int = field(1234,
        "Seed of a synthetic task's evaluation rows and of sampling (differs from the training seed so a "
        "task draws other prompts).")

    def check(self) -> list[tuple[str, str]]:
        return [(f"k.{i}", f"pass@{k} needs 1 <= k <= eval.num_samples={self.num_samples}")
                for i, k in enumerate(self.k) if not 1 <= k <= self.num_samples]


class RewardSpec(Section):
    """One reward function. In YAML a bare string is shorthand for `{fn: <string>}`."""

    fn: str = field("",
        "A registered reward name, `package.module:function` or `path/to/file.py:function` (relative to "
        "the config file's folder, then to the current directory).", required=True)
    weight: float = field(1.0, "Weight in the summed reward.")
    on_error: Literal["error", "zero", "skip"] = field("error",
        "When a call raises, times out or returns NaN / a wrong length: `error` stops the run, `zero` "
        "scores the affected samples 0, `skip` leaves them out of this reward (counted in "
        "`rewards/<name>/errors`).")
    timeout_s: float | None = field(DEFAULT_REWARD_TIMEOUT_S,
        "Per-call time limit in seconds: a call past it fails naming the reward, under `on_error`; null = "
        "no limit (only when set so explicitly: a reward that never returns would hang the run).", gt=0)
    kwargs: dict[str, Any] = field({}, "Extra keyword arguments for the function.")
    name: str | None = field(None, "Name in the logs (`rewards/<name>/mean`); null = derived from fn.")


SHORTHAND_FIELD[RewardSpec] = "fn"  # `rewards: [synthetic_accuracy]` = `rewards: [{fn: synthetic_accuracy}]`


class LoggingConfig(Section):
    """Metrics, samples and trackers. metrics.jsonl is always written."""

    log_every: int = field(1, "Log metrics every this many optimizer steps.", ge=1)
    sample_every: int = field(10, "Log a table of completions every this many rollouts; 0 = never.", ge=0)
    num_samples: int = field(4, "Completions per sample table.", ge=0)
    trackers: list[Literal["tensorboard", "trackio", "wandb"]] = field([],
        "Experiment trackers besides metrics.jsonl.")
    progress: bool = field(True, "Show a progress bar.")
    project: str = field("gspo", "Tracker project name.")


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
    """Each section's own rules (`Section.check`), then the rules across sections and the registry names;
    returns the problems (empty = valid)."""
    errors: list[ConfigError] = []

    def err(key: str, msg: str) -> None:
        errors.append(ConfigError(f"{key}: {msg}", key))

    r, a, m, d = cfg.rollout, cfg.algorithm, cfg.model, cfg.data
    n, k = cfg.completions_per_rollout, a.num_minibatches
    if n % k:
        err("algorithm.num_minibatches", "rollout.prompts_per_step * rollout.group_size = "
            f"{r.prompts_per_step} * {r.group_size} = {n} completions do not split into {k} equal "
            "minibatches; choose algorithm.num_minibatches among the divisors of that product")
    for name in Config.model_fields:  # each section's own rules
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
