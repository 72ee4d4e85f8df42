"""LoRA (peft) on MoE policies: adapters on attention and routed experts (3-D `target_parameters`), routers left
alone, merged weight sync that makes vLLM sample exactly the trainer's policy, frozen base weights, LoRA resume,
and a merged `final/` that is a plain HF checkpoint (the next stage loads it)."""

import json
import math
import os
import textwrap
import types

import pytest
import torch
from conftest import tiny_config

from gspo.models.loading import build_tiny_model, load_policy, provenance
from gspo.models.lora import apply_lora, check_sync_mode, from_adapter, resolve_targets
from gspo.moe import find_routers
from gspo.registry import MODEL_FAMILIES
from gspo.rollout.base import SamplingSpec
from gspo.training.logprobs import completion_logprobs

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Per family: Linear targets (attention, and the shared experts where the family has them).
LINEAR_TARGETS = {
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2_moe": ["q_proj", "v_proj", "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"],
    "mixtral": ["q_proj", "o_proj"],
    "olmoe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "deepseek_v3": ["q_b_proj", "kv_b_proj", "o_proj", "shared_experts.down_proj"],
    "gpt_oss": ["q_proj", "o_proj"],
}
REWARD_FILE = textwrap.dedent(
    """
    def distinct_chars(prompts, completions, completion_ids, **kwargs):
        return [len(set(c)) / 16.0 for c in completions]
    """
)


def _lora_cfg(**kw):
    base = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "o_proj"], "target_parameters": EXPERTS}
    return types.SimpleNamespace(**{**base, **kw})


def _policy(family, tmp_path):
    path = build_tiny_model(family, tmp_path / family)
    attn = "eager" if family == "gpt_oss" else None
    return load_policy(types.SimpleNamespace(name_or_path=path, dtype="float32", attn_implementation=attn),
                       output_dir=tmp_path)


def _sample_logp(model, seed=0, n=4, t=10):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(9, 100, (3 + i,), generator=g).tolist() for i in range(n)]
    ids = torch.randint(9, 100, (n, t), generator=g)
    with torch.no_grad():
        return completion_logprobs(model, prompts, ids, torch.ones(n, t), group_size=1, pad_token_id=0)


# ----------------------------------------------------------------------------------------------------------
# Targets, parameter count, routers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", MODEL_FAMILIES.names())
def test_trainable_count_experts_adapted_router_frozen(family, tmp_path):
    model, _ = _policy(family, tmp_path)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    routers = {r.name for r in find_routers(model)}
    cfg = _lora_cfg(target_modules=LINEAR_TARGETS[family])
    peft_model = apply_lora(model, cfg)
    info = peft_model.gspo_lora

    # Expected count from the shapes alone: a Linear [out, in] gets r·(in + out); a 3-D expert tensor
    # [E, a, b] gets E·r·(a + b) (one rank-r pair per expert).
    expected = 0
    for name in info.target_modules:
        out_f, in_f = shapes[f"{name}.weight"]
        expected += cfg.r * (in_f + out_f)
    for name in info.target_parameters:
        e, a, b = shapes[name]
        expected += e * cfg.r * (a + b)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert info.trainable_params == expected == sum(p.numel() for p in trainable.values())
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert info.metrics()["lora/trainable_params"] == expected
    assert 0 < info.metrics()["lora/trainable_frac"] < 0.2
    # Routed experts of every MoE layer are adapted (both tensors), the routers never.
    moe_layers = {n.split(".mlp.")[0] for n in shapes if n.endswith("mlp.experts.gate_up_proj")}
    assert len(info.target_parameters) == 2 * len(moe_layers) > 0
    assert not any(t.startswith(r + ".") or t == r for t in (*info.target_modules, *info.target_parameters)
                   for r in routers)
    for name, p in peft_model.named_parameters():
        if any(f"{r}." in name for r in routers):
            assert not p.requires_grad, name


def test_wildcards_skip_the_router_an_explicit_entry_does_not(tmp_path):
    model, _ = _policy("qwen2_moe", tmp_path)
    routers = {r.name for r in find_routers(model)}
    # A bare "weight" covers every 2-D weight, the routers' included: they are skipped.
    modules, params = resolve_targets(model, _lora_cfg(target_modules=[], target_parameters=["weight"]))
    assert any(n.endswith("self_attn.q_proj.weight") for n in params)
    assert any(n.endswith("shared_expert_gate.weight") for n in params)  # a gate, not a router
    assert not any(n.rsplit(".", 1)[0] in routers for n in params)
    modules, _ = resolve_targets(model, _lora_cfg(target_modules=["all-linear"], target_parameters=[]))
    assert any(n.endswith("shared_expert.up_proj") for n in modules) and not set(modules) & routers
    # Naming the router adapts it.
    _, params = resolve_targets(model, _lora_cfg(target_modules=[], target_parameters=["mlp.gate.weight"]))
    assert {n.rsplit(".", 1)[0] for n in params} == routers


def test_shared_expert_adapter_round_trips_and_merges(tmp_path):
    """DeepSeek-V3: shared-expert Linear targets (which peft's v4->v5 conversion would turn into routed-expert
    targets) stay what the config names; the saved adapter and the merged model both reproduce the policy."""
    from transformers import AutoModelForCausalLM

    from gspo.models.lora import save_lora

    model, tok = _policy("deepseek_v3", tmp_path)
    targets = ["o_proj", "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"]
    peft_model = apply_lora(model, _lora_cfg(target_modules=targets))
    assert sum(n.endswith("shared_experts.down_proj") for n in peft_model.gspo_lora.target_modules) == 1
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    want = _sample_logp(peft_model)
    save_lora(peft_model, str(tmp_path / "ckpt"), tok, save="both")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "model")
    assert float((_sample_logp(plain) - want).abs().max()) < 1e-5
    fresh, _ = _policy("deepseek_v3", tmp_path)
    assert float((_sample_logp(fresh) - want).abs().max()) > 1e-2
    again = from_adapter(fresh, str(tmp_path / "ckpt" / "adapter"))
    assert float((_sample_logp(again) - want).abs().max()) < 1e-5


@pytest.mark.parametrize(("field", "value"), [("target_modules", ["q_proj", "w_nothing"]),
                                              ("target_parameters", ["mlp.experts.w13"])])
def test_a_target_that_matches_nothing_names_the_field(field, value, tmp_path):
    model, _ = _policy("qwen3_moe", tmp_path)
    with pytest.raises(ValueError, match=rf"lora\.{field} entry '{value[-1]}' matches no"):
        apply_lora(model, _lora_cfg(**{field: value}))




# ----------------------------------------------------------------------------------------------------------
# The trainer with LoRA
# ----------------------------------------------------------------------------------------------------------


def _cfg(tmp_path, family, *overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    reward = tmp_path / "my_rewards.py"
    reward.write_text(REWARD_FILE)
    return tiny_config("reasoning_rl.yaml", tmp_path / "out", f"model.name_or_path=tiny:{family}",
                       f"rewards=[{reward}:distinct_chars]", "rollout.prompts_per_step=4", "rollout.group_size=4",
                       "algorithm.num_minibatches=2", "optim.lr=2e-2", "lora.enabled=true", "lora.r=4",
                       "lora.alpha=8", "lora.target_modules=[q_proj,o_proj]",
                       f"lora.target_parameters=[{','.join(EXPERTS)}]", *overrides)


def test_adapter_sync_is_rejected_at_trainer_start(tmp_path):
    from gspo.training.trainer import GSPOTrainer

    with pytest.raises(ValueError, match=r"lora\.sync=adapter is not supported.*Triton.*lora\.sync: merge"):
        GSPOTrainer(_cfg(tmp_path, "qwen3_moe", "rollout.engine=vllm_colocate", "lora.sync=adapter"))
    check_sync_mode(types.SimpleNamespace(sync="merge"), "vllm_colocate")


def _base_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def _engine_gap(trainer, seed):
    """max |engine logp - trainer logp| over a fresh batch sampled by the engine."""
    prompts = [trainer._prompt_ids(trainer.dataset.rows[i]) for i in range(4)]
    batch = trainer.engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=8, temperature=1.0, seed=seed))
    with torch.no_grad():
        logp = trainer._logp(batch).float().cpu()
    return float((batch.logp.float() - logp)[batch.mask.bool()].abs().max())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_merged_sync_makes_vllm_match_the_trainer_and_base_stays_untouched(family, tmp_path):
    from gspo.training.trainer import GSPOTrainer

    trainer = GSPOTrainer(_cfg(tmp_path, family, "rollout.engine=vllm_colocate", "train.num_rollouts=2"))
    try:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        before = _base_params(policy)
        rows = [r for _ in range(2) for r in trainer.step()]
        assert len(rows) == 4 and all(math.isfinite(r["loss"]) for r in rows)
        assert rows[-1]["lora/trainable_params"] == policy.gspo_lora.trainable_params
        # Adapters moved away from zero (B starts at 0), the policy differs from the base ...
        with policy.disable_adapter():
            base_logp = _sample_logp(policy)
        assert float((_sample_logp(policy) - base_logp).abs().max()) > 1e-2
        # ... and after merge + sync vLLM's logprobs are the trainer's (also at rollout 2's sampling).
        assert rows[-1]["logp_gap/max"] < 1e-4
        assert _engine_gap(trainer, 11) < 1e-4
        # An update the engine has not been sent: the engine is stale; one sync fixes it.
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.add_(0.05 * torch.randn_like(p))
        assert _engine_gap(trainer, 12) > 1e-2
        trainer.engine.update_weights(policy)
        assert _engine_gap(trainer, 13) < 1e-4
        # Every non-LoRA parameter is bit-identical to what it was before training (and to the checkpoint).
        after = _base_params(policy)
        assert before.keys() == after.keys()
        for n, p in before.items():
            assert torch.equal(p, after[n]), n
    finally:
        trainer.engine.close()


def test_vllm_lora_resume_syncs_the_adapter_into_the_fresh_engine(tmp_path):
    from gspo.training.trainer import GSPOTrainer

    args = ["rollout.engine=vllm_colocate", "train.save_every=1"]
    first = GSPOTrainer(_cfg(tmp_path, "qwen3_moe", *args, "train.num_rollouts=1"))
    first.train()
    resumed = GSPOTrainer(_cfg(tmp_path, "qwen3_moe", *args, "train.num_rollouts=2", "resume_from=latest"))
    try:
        policy = resumed.accelerator.unwrap_model(resumed.model)
        with policy.disable_adapter():
            base_logp = _sample_logp(policy)
        assert float((_sample_logp(policy) - base_logp).abs().max()) > 1e-2  # the adapter came back
        assert _engine_gap(resumed, 21) < 1e-4  # and the engine (started from the base) has it
        rows = resumed.step()
        assert rows[0]["step"] == 3 and rows[0]["logp_gap/max"] < 1e-4
    finally:
        resumed.engine.close()


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_lora_resume_reproduces_the_uninterrupted_run_and_final_is_a_plain_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gspo.training.trainer import GSPOTrainer

    # beta > 0: the KL reference is the base with adapters disabled (no second model).
    args = ["rollout.engine=hf_generate", "train.save_every=1", "train.num_rollouts=4", "algorithm.beta=0.05"]
    full = GSPOTrainer(_cfg(tmp_path / "full", "qwen3_moe", *args))
    final = full.train()

    first = GSPOTrainer(_cfg(tmp_path / "resumed", "qwen3_moe", *args[:-2], "train.num_rollouts=2",
                             "algorithm.beta=0.05"))
    first.train()
    ckpt = tmp_path / "resumed" / "out" / "checkpoints" / "rollout-000002"
    assert (ckpt / "adapter" / "adapter_config.json").is_file() and (ckpt / "model" / "config.json").is_file()
    resumed = GSPOTrainer(_cfg(tmp_path / "resumed", "qwen3_moe", *args, "resume_from=latest"))
    resumed.train()

    a, b = _metrics(tmp_path / "full" / "out"), _metrics(tmp_path / "resumed" / "out")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    # π_θ = reference until the adapters move (up to float rounding: the two passes batch rows differently)
    assert abs(a[0]["kl"]) < 1e-9 and max(r["kl"] for r in a) > 1e-6
    for ra, rb in zip(a, b):
        for key, va in ra.items():
            if key.startswith("timing/"):
                continue
            vb = rb[key]
            assert va == vb or (isinstance(va, float) and math.isclose(va, vb, rel_tol=1e-6, abs_tol=1e-9)), \
                (ra["step"], key, va, vb)

    # final/ is the merged policy as a plain HF checkpoint; final_adapter/ the peft adapter.
    policy = full.accelerator.unwrap_model(full.model)
    want = _sample_logp(policy)
    assert not os.path.exists(os.path.join(final, "adapter_config.json"))
    plain = AutoModelForCausalLM.from_pretrained(final)
    assert float((_sample_logp(plain) - want).abs().max()) < 1e-5
    base = AutoModelForCausalLM.from_pretrained(provenance(policy)["loaded_from"])
    with_adapter = PeftModel.from_pretrained(base, final + "_adapter")
    assert float((_sample_logp(with_adapter) - want).abs().max()) < 1e-5
    again = from_adapter(AutoModelForCausalLM.from_pretrained(provenance(policy)["loaded_from"]), final + "_adapter")
    assert float((_sample_logp(again) - want).abs().max()) < 1e-5

    # Chaining: the next (LoRA) stage starts from final/ and trains on top of the merged weights.
    nxt = GSPOTrainer(_cfg(tmp_path / "next", "qwen3_moe", "rollout.engine=hf_generate", "train.num_rollouts=1",
                           f"model.name_or_path={final}"))
    start = _sample_logp(nxt.accelerator.unwrap_model(nxt.model))
    assert float((start - want).abs().max()) < 1e-5  # fresh adapters (B = 0): exactly the previous stage
    assert all(math.isfinite(r["loss"]) for r in nxt.step())


def test_sft_stage_trains_adapters_only_and_writes_merged_final(tmp_path):
    """`lora.enabled` in an sft stage: only adapters train, final/ is a plain merged model, final_adapter/ peft."""
    import os as _os

    from conftest import tiny_config
    from safetensors.torch import load_file

    from gspo.models.loading import resolve_model_path
    from gspo.training.sft import run_sft

    cfg = tiny_config("cold_start.yaml", tmp_path / "sft", "lora.enabled=true", "sft.max_steps=5",
                      "lora.target_modules=[q_proj,v_proj]")
    final = run_sft(cfg)
    assert _os.path.isfile(_os.path.join(final + "_adapter", "adapter_config.json"))
    base = load_file(_os.path.join(resolve_model_path("tiny:qwen3_moe", tmp_path / "sft"), "model.safetensors"))
    merged = load_file(_os.path.join(final, "model.safetensors"))
    assert set(merged) == set(base)  # plain checkpoint names, no peft prefixes
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # only adapted weights moved
