"""The config sections: one `Section` per concern (model, data, rollout, algorithm, optim, train, moe, lora,
sft, rejection, reward_model, eval, logging) and `RewardSpec`, one item of `rewards`. Every field is documented
once, next to its definition (`field(default, help)`); `docs/config.md` is generated from these definitions
(`gspo config-reference`). A rule across a section's own fields is its `check()`; rules across sections are
`gspo.config.checks`'.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from gspo.config.parse import SHORTHAND_FIELD, Section, field
from gspo.rewards import DEFAULT_REWARD_TIMEOUT_S

# A data.path that names a local file (an HF dataset id looks like "org/name").
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def _looks_local(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~")) or path.lower().endswith(_FILE_SUFFIXES)
            or os.path.exists(os.path.expanduser(path)))


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
    logp_gap_every: int = field(10,
        "The engine returns its sampled tokens' logprobs for logp_gap/* (engine vs trainer pi_old) on the first "
        "3 rollouts and every k-th after; 1 = every rollout, 0 = never. Rollouts that need them "
        "(old_logp_source=engine, algorithm.tis_cap / tis_mask_bound, max_staleness > 0) always get them.",
        ge=0)
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


