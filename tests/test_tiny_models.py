"""Tiny-model factory, tokenizer, policy loading and checkpoint-format weight names."""

from __future__ import annotations

import glob
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gspo.models.loading import (
    TAG_TOKENS,
    build_tiny_model,
    build_tokenizer,
    checkpoint_state_items,
    load_policy,
    provenance,
)
from gspo.registry import MODEL_FAMILIES, RegistryError

ALL_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]


def _saved_tensors(path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _cfg(**kw):
    base = {"name_or_path": "tiny:qwen3_moe", "tokenizer": None, "dtype": "float32", "experts_implementation": "auto",
                "attn_implementation": None, "trust_remote_code": False, "gradient_checkpointing": False, "tiny": {}}
    base.update(kw)
    return SimpleNamespace(**base)


def test_tokenizer_round_trip_and_chat_template(tmp_path):
    build_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert 100 <= len(tok) <= 120
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    text = "Solve: 12*(3+4) = ?\n\tok ~{}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    for special in ("<|im_start|>", "<|im_end|>", "<|pad|>", "<|endoftext|>", *TAG_TOKENS):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    # Tags survive decoding with skip_special_tokens (rewards read them); ChatML control tokens do not.
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_end|>" in chat
    answer = tok("<think>x</think><answer>4</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(answer, skip_special_tokens=True) == "<think>x</think><answer>4</answer>"
    assert answer[-1] == tok.eos_token_id


def test_families_registered():
    for name in ALL_FAMILIES:
        assert name in MODEL_FAMILIES
    with pytest.raises(RegistryError, match="qwen3_moe"):
        MODEL_FAMILIES.get("qwen3-moe")


def test_build_is_deterministic_and_reused(tmp_path):
    a = build_tiny_model("qwen3_moe", tmp_path / "a", seed=3)
    b = build_tiny_model("qwen3_moe", tmp_path / "b", seed=3)
    c = build_tiny_model("qwen3_moe", tmp_path / "c", seed=4)
    sa, sb, sc = _saved_tensors(a), _saved_tensors(b), _saved_tensors(c)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    stamp = os.path.join(a, "model.safetensors")
    mtime = os.stat(stamp).st_mtime_ns
    assert build_tiny_model("qwen3_moe", tmp_path / "a", seed=3) == a
    assert os.stat(stamp).st_mtime_ns == mtime  # same recipe: re-used, not rewritten
    build_tiny_model("qwen3_moe", tmp_path / "a", seed=5)  # different recipe: replaced
    assert not torch.equal(_saved_tensors(a)["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_checkpoint_state_items_match_save_pretrained(family, tmp_path):
    """Names and tensors equal what save_pretrained writes, also after the weights changed in memory
    (Mixtral's experts are fused/renamed in memory, so a plain state_dict would not match)."""
    path = build_tiny_model(family, tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "saved")
    saved = _saved_tensors(str(tmp_path / "saved"))
    items = dict(checkpoint_state_items(model))
    assert items.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(items[name], tensor), name
    # The in-memory perturbation is what we read (not the file the model came from).
    original = _saved_tensors(path)
    assert any(not torch.equal(original[k], items[k]) for k in original)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_load_policy_experts_backends(family, tmp_path):
    """auto -> grouped_mm on CPU float32 (measured to work for every family); it matches eager in forward
    and backward."""
    auto_model, tok = load_policy(_cfg(name_or_path=f"tiny:{family}"), output_dir=tmp_path)
    assert provenance(auto_model)["experts_implementation"] == "grouped_mm"
    assert provenance(auto_model)["experts_requested"] == "auto"
    eager_model, _ = load_policy(_cfg(name_or_path=f"tiny:{family}", experts_implementation="eager"),
                                 output_dir=tmp_path)
    assert provenance(eager_model)["experts_implementation"] == "eager"
    assert provenance(auto_model)["loaded_from"] == os.path.join(str(tmp_path), "tiny_model")
    ids = torch.randint(5, len(tok), (2, 9), generator=torch.Generator().manual_seed(0)).to(auto_model.device)
    out_a, out_e = auto_model(ids).logits, eager_model(ids).logits
    torch.testing.assert_close(out_a, out_e, atol=1e-5, rtol=1e-5)
    out_a.square().mean().backward()
    out_e.square().mean().backward()
    ga = dict(auto_model.named_parameters())
    for name, p in eager_model.named_parameters():
        if "experts" in name:
            torch.testing.assert_close(ga[name].grad, p.grad, atol=1e-6, rtol=1e-4)


def test_load_policy_options_and_errors(tmp_path):
    model, tok = load_policy(
        _cfg(tiny={"seed": 7, "num_hidden_layers": 1}, gradient_checkpointing=True, dtype="bfloat16"),
        output_dir=tmp_path,
    )
    assert model.config.num_hidden_layers == 1
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.is_gradient_checkpointing
    assert tok.eos_token_id == model.config.eos_token_id
    with pytest.raises(ValueError, match="experts_implementation.*eager"):
        load_policy(_cfg(experts_implementation="fast"), output_dir=tmp_path)
    with pytest.raises(ValueError, match="model.dtype.*float32"):
        load_policy(_cfg(dtype="fp32"), output_dir=tmp_path)
    with pytest.raises(RegistryError, match="valid"):
        load_policy(_cfg(name_or_path="tiny:qwen4_moe"), output_dir=tmp_path)
