"""The transformers-generate engine: sampler logprobs equal the trainer's recompute, finish reasons, seeds,
prompt-major order, and weight updates into a separate copy."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gspo import rollout
from gspo.config import RolloutConfig
from gspo.models.loading import build_tiny_model
from gspo.registry import RegistryError
from gspo.rollout.base import RolloutEngine, SamplingSpec
from gspo.training.logprobs import completion_logprobs

HF = RolloutConfig(engine="hf_generate")


def run_inputs(path, tok, model=None):
    return rollout.EngineInputs(path, tok, dtype="float32", seed=0, max_model_len=256, model=model)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("hf_engine"))
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    engine = rollout.build_engine(HF, run_inputs(path, tok, model))
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
               for q in ("hi", "What is 12+30?", "x")]
    return path, tok, model, engine, prompts


def recompute(model, batch, tok, temperature):
    with torch.no_grad():
        return completion_logprobs(model, batch.prompt_ids, batch.completion_ids, batch.mask,
                                   group_size=batch.group_size, pad_token_id=tok.pad_token_id,
                                   temperature=temperature)


def test_registry_and_protocol(setup):
    *_, engine, _ = setup
    assert isinstance(engine, RolloutEngine)
    with pytest.raises(RegistryError, match="hf_generate"):
        rollout.build_engine(RolloutConfig(engine="hf-generate"), None)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_recompute(setup, temperature):
    _, tok, model, engine, prompts = setup
    batch = engine.generate(prompts, SamplingSpec(n=3, max_new_tokens=10, temperature=temperature, seed=1))
    assert batch.completion_ids.shape[0] == len(prompts) * 3
    gap = ((batch.logp - recompute(model, batch, tok, temperature)).abs() * batch.mask).max().item()
    assert gap < 1e-5
    assert torch.all(batch.logp[batch.mask == 0] == 0)


def test_checkpoint_generation_config_processors_are_switched_off(setup):
    """A checkpoint's generation_config (repetition penalty, n-gram bans...) must not shape the rollouts: the
    trainer's logprobs know nothing of it, so the sampler's must match them."""
    _, tok, model, engine, prompts = setup
    saved = model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.8, 2
    try:
        batch = engine.generate(prompts, SamplingSpec(n=3, max_new_tokens=12, seed=2))
    finally:
        model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = saved
    gap = ((batch.logp - recompute(model, batch, tok, 1.0)).abs() * batch.mask).max().item()
    assert gap < 1e-5


def test_top_k_logprobs_are_the_truncated_distribution(setup):
    """With top-k the sampler draws from the renormalized top-k set: its logprob is >= the full-softmax one
    and every drawn token is among the k most likely."""
    _, tok, model, engine, prompts = setup
    batch = engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=8, top_k=3, seed=2))
    full = recompute(model, batch, tok, 1.0)
    m = batch.mask.bool()
    assert torch.all(batch.logp[m] >= full[m] - 1e-6)
    assert (batch.logp[m] - full[m]).max() > 1e-3


def test_finish_reasons(setup):
    _, tok, _, engine, prompts = setup
    cut = engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=3, seed=0, stop_token_ids=()))
    eos = tok.eos_token_id
    for i, reason in enumerate(cut.finish_reasons):
        ids = cut.completion_ids[i, : int(cut.lengths[i])].tolist()
        assert (reason == "stop") == (ids[-1] == eos)
        if reason == "length":
            assert len(ids) == 3
    assert "length" in cut.finish_reasons
    # Many stop tokens: most rows stop early; a stop row ends with its (first) stop token.
    stops = tuple(range(10, 90))
    batch = engine.generate(prompts, SamplingSpec(n=4, max_new_tokens=12, seed=0, stop_token_ids=stops))
    assert "stop" in batch.finish_reasons
    for i, reason in enumerate(batch.finish_reasons):
        ids = batch.completion_ids[i, : int(batch.lengths[i])].tolist()
        hits = [k for k, t in enumerate(ids) if t in stops or t == tok.eos_token_id]
        if reason == "stop":
            assert hits == [len(ids) - 1]
        else:
            assert hits == [] and len(ids) == 12
        assert batch.completion_ids[i, len(ids):].eq(tok.pad_token_id).all()
        assert batch.completions[i] == tok.decode(ids, skip_special_tokens=True)


def test_seeds(setup):
    *_, engine, prompts = setup
    spec = SamplingSpec(n=3, max_new_tokens=8, seed=11)
    rng_before = torch.random.get_rng_state()
    a, b = engine.generate(prompts, spec), engine.generate(prompts, spec)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logp, b.logp)
    c = engine.generate(prompts, SamplingSpec(n=3, max_new_tokens=8, seed=12))
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # The G completions of one prompt are not copies of each other.
    assert len({tuple(r) for r in a.completion_ids[:3].tolist()}) > 1


def test_a_call_without_logprobs_draws_the_same_tokens(setup):
    """SamplingSpec.logprobs=False drops the logprob capture (a full-vocab log_softmax per step), not a token."""
    *_, engine, prompts = setup
    spec = SamplingSpec(n=3, max_new_tokens=8, temperature=0.7, top_k=20, seed=11)
    with_lp, without = engine.generate(prompts, spec), engine.generate(prompts, dataclasses.replace(spec, logprobs=False))
    assert without.logp is None and with_lp.logp is not None
    assert torch.equal(without.completion_ids, with_lp.completion_ids) and torch.equal(without.mask, with_lp.mask)
    assert without.finish_reasons == with_lp.finish_reasons


def test_a_slice_sampled_with_its_offset_gets_the_whole_calls_completions(setup):
    """One prompt per generate call: a process sampling prompts[1:] with first_prompt=1 gets exactly the rows
    the whole call gives them (how a rollout split across processes keeps the unsplit run's samples)."""
    from gspo.rollout.hf_generate import HFGenerateEngine

    _, tok, model, _, prompts = setup
    engine = HFGenerateEngine(model, tok, batch_prompts=1)
    spec = SamplingSpec(n=3, max_new_tokens=8, seed=5)
    whole = engine.generate(prompts, spec)
    part = engine.generate(prompts[1:], dataclasses.replace(spec, first_prompt=1))
    width = part.completion_ids.shape[1]
    assert torch.equal(part.completion_ids, whole.completion_ids[3:, :width])
    assert part.completions == whole.completions[3:]
    torch.testing.assert_close(part.logp, whole.logp[3:, :width])
    # Without the offset the slice would reuse prompt 0's seeds: different samples.
    assert not torch.equal(engine.generate(prompts[1:], spec).completion_ids, part.completion_ids)


def test_prompt_major_order_and_padding(setup):
    """Greedy: rows b*G .. b*G+G-1 all equal prompt b's greedy completion generated alone, although the
    prompts have different lengths (left padding must not change anything)."""
    _, tok, _, engine, prompts = setup
    assert len({len(p) for p in prompts}) > 1
    spec = SamplingSpec(n=2, max_new_tokens=8, temperature=0.0)
    batch = engine.generate(prompts, spec)
    for b, prompt in enumerate(prompts):
        alone = engine.generate([prompt], spec)
        n_tok = alone.completion_ids.shape[1]
        for k in range(spec.n):
            row = batch.completion_ids[b * spec.n + k]
            assert torch.equal(row[:n_tok], alone.completion_ids[0]) and row[n_tok:].eq(tok.pad_token_id).all()


def test_update_weights_into_separate_copy(setup):
    path, tok, _, _, prompts = setup
    engine = rollout.build_engine(HF, run_inputs(path, tok))
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in trainer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    spec = SamplingSpec(n=2, max_new_tokens=6, seed=3)
    before = engine.generate(prompts, spec)
    assert ((before.logp - recompute(trainer, before, tok, 1.0)).abs() * before.mask).max() > 1e-2
    engine.update_weights(trainer)
    after = engine.generate(prompts, spec)
    assert ((after.logp - recompute(trainer, after, tok, 1.0)).abs() * after.mask).max() < 1e-5


def test_import_is_light():
    """Importing the rollout package (both engines' modules) must not import vLLM (fresh interpreter)."""
    code = "import sys, gspo.rollout, gspo.rollout.vllm_colocate; assert 'vllm' not in sys.modules, 'vllm'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
