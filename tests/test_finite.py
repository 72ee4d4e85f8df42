"""Non-finite weights, gradients and logits stop the run with one line naming the rollout, the hop and the
first non-finite tensor (gspo.models.finite, gspo.training.finite), never with a sampler's device assert."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer

from gspo import rollout
from gspo.config import RolloutConfig
from gspo.models.finite import NonFiniteError, first_non_finite
from gspo.models.loading import build_tiny_model
from gspo.rollout.base import SamplingSpec
from gspo.training.finite import (
    at_rollout,
    check_gradient_norm,
    check_logprobs,
    check_parameters,
    clip_gradients,
    gradient_norm,
)

FIRST = "model.layers.0.mlp.experts.down_proj"  # in named_parameters() order, before the second plant
SECOND = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("finite"))
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
               for q in ("hi", "What is 12+30?")]
    return path, tok, prompts


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _plant(model):
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[SECOND][3, 5] = float("nan")
        params[FIRST][2, 7, 1] = float("inf")


def _engine(path, tok, model):
    return rollout.build_engine(RolloutConfig(engine="hf_generate"),
                                rollout.EngineInputs(path, tok, dtype="float32", seed=0, max_model_len=256,
                                                     model=model))


@pytest.mark.timeout(120)
def test_generation_guard_names_the_first_bad_parameter_instead_of_sampling(tiny):
    path, tok, prompts = tiny
    model = _model(path)
    _plant(model)
    engine = _engine(path, tok, model)
    with pytest.raises(NonFiniteError) as e, at_rollout(2):
        engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=6, temperature=1.0, top_k=5, seed=0))
    msg = str(e.value)
    assert msg.startswith("non-finite values at rollout 2, hop rollout: ")
    assert f"parameter {FIRST} (first of 2 non-finite)" in msg
    assert "logits at generation step 1, rows [0, 1, 2, 3] (4 rows)" in msg  # o_proj's NaN reaches every row
    assert "\n" not in msg and e.value.rollout == 2 and e.value.hop == "rollout"


@pytest.mark.timeout(120)
def test_generation_guard_names_the_step_and_rows_of_an_overflow(tiny):
    """Finite weights, an inf arising in the forward pass (as a bf16 overflow would) at the third step, in one
    row: the guard names that step and row, and says the parameters are finite."""
    path, tok, prompts = tiny
    model = _model(path)
    calls = []

    def overflow(module, args, out):
        calls.append(1)
        if len(calls) == 3:  # prefill = step 1, then one token per step
            out = out.clone()
            out[2, -1, 0] = float("inf")
        return out

    model.lm_head.register_forward_hook(overflow)
    engine = _engine(path, tok, model)
    with pytest.raises(NonFiniteError, match=r"hop rollout: all parameters finite; logits at generation step 3, "
                                             r"rows \[2\] \(1 row\)$"):
        engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=6, temperature=1.0, seed=0))


@pytest.mark.timeout(120)
def test_healthy_generation_with_top_k_passes_the_guard(tiny):
    """top-k sets -inf on purpose: the guard reads the raw logits only."""
    path, tok, prompts = tiny
    batch = _engine(path, tok, _model(path)).generate(
        prompts, SamplingSpec(n=2, max_new_tokens=6, temperature=0.7, top_k=3, top_p=0.9, seed=0))
    assert torch.isfinite(batch.logp).all()


@pytest.mark.timeout(120)
def test_finder_names_the_first_bad_parameter_and_gradient(tiny):
    path, _, _ = tiny
    model = _model(path)
    assert first_non_finite(model.named_parameters()) == (None, 0)
    check_parameters(model, 1)  # healthy: nothing raised
    _plant(model)
    assert first_non_finite(model.named_parameters()) == (FIRST, 2)
    with pytest.raises(NonFiniteError) as e:
        check_parameters(model, 4, hop="weight_sync")
    assert str(e.value) == f"non-finite values at rollout 4, hop weight_sync: parameter {FIRST} (first of 2 non-finite)"

    model = _model(path)
    ids = torch.randint(5, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    norm, plain = gradient_norm(model)
    grads = [p.grad.clone() for p in model.parameters()]
    assert float(plain) == pytest.approx(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))),
                                         rel=1e-4)  # float32 sums in another order
    check_gradient_norm(float(plain), model, 3)  # healthy: nothing raised
    with pytest.raises(NonFiniteError, match=r"^non-finite values at rollout 3, hop update: gradient norm inf "
                                             r"\(every gradient is finite: their norm overflowed\)$"):
        check_gradient_norm(float("inf"), model, 3)
    clip_gradients(model, float(plain) / 2, norm)  # clipping to half the norm halves every gradient
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g / 2, rtol=1e-5, atol=0)
    dict(model.named_parameters())[SECOND].grad[0, 0] = float("nan")
    _, plain = gradient_norm(model)
    with pytest.raises(NonFiniteError, match=rf"^non-finite values at rollout 3, hop update: gradient of {SECOND} "
                                             r"\(first of 1 non-finite\)$"):
        check_gradient_norm(float(plain), model, 3)


@pytest.mark.timeout(30)
def test_logprob_check_ignores_padding_and_names_rows():
    logp = torch.zeros(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    logp[0, 3] = float("nan")  # padding: ignored
    check_logprobs(logp, mask, 5)
    logp[2, 0] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"^non-finite values at rollout 5, hop old_logprobs: old_logprobs of "
                                             r"completion rows \[2\] \(1 row\)$"):
        check_logprobs(logp, mask, 5)


def _sharded_worker(rank, world, path, tmp):
    import torch.distributed as dist

    from gspo.training.fsdp import shard_policy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        model = shard_policy(_model(path))
        param = dict(model.named_parameters())[FIRST]
        local = param.to_local()
        if rank == 1:  # only rank 1's shard is bad: both ranks must still name it
            with torch.no_grad():
                local[-1, 0, 0] = float("nan")
        torch.save(first_non_finite(model.named_parameters()), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_finder_on_sharded_parameters_agrees_over_processes(tiny, tmp_path):
    path, _, _ = tiny
    mp.start_processes(_sharded_worker, args=(2, path, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == (FIRST, 1)


@pytest.mark.timeout(300)
def test_trainer_stops_at_the_first_nan_gradient_before_any_weight_changes(warm_model, tmp_path):
    """The GPU failure's shape (a finite loss whose backward gives NaN gradients, then NaN weights, then a device
    assert in the next rollout's sampling), planted on CPU: the run stops in rollout 1's update naming the
    parameter, and no weight was touched by the NaN step."""
    from dataclasses import replace

    from conftest import tiny_config

    from gspo.training.trainer import GSPOTrainer

    cfg = tiny_config("reasoning_rl.yaml", tmp_path, f"model.name_or_path={warm_model}",
                      "rollout.engine=hf_generate", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8")
    trainer = GSPOTrainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    loss_fn = trainer.spec.fn

    def nan_gradient_loss(logp, *args, **kwargs):
        out = loss_fn(logp, *args, **kwargs)
        poison = (logp * 0).sum().sqrt() * 0  # finite value (0), NaN gradient (d sqrt(x)/dx at 0 is inf; inf * 0)
        return replace(out, loss=out.loss + poison)

    trainer.spec = replace(trainer.spec, fn=nan_gradient_loss)
    with pytest.raises(NonFiniteError) as err:
        trainer.step()
    msg = str(err.value)
    assert msg.startswith("non-finite values at rollout 1, hop update: gradient of ") and "\n" not in msg, msg
    assert err.value.rollout == 1 and err.value.hop == "update"
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


@pytest.mark.timeout(300)
def test_trainer_stops_at_old_logprobs_of_a_nan_weight(warm_model, tmp_path):
    """A NaN weight the sampler does not trip on (here: the engine is a stand-in that returns finished
    completions) is caught by the π_old check, naming the rollout, the hop and the rows."""
    from conftest import tiny_config

    from gspo.training.trainer import GSPOTrainer

    cfg = tiny_config("reasoning_rl.yaml", tmp_path, f"model.name_or_path={warm_model}",
                      "rollout.engine=hf_generate", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8")
    trainer = GSPOTrainer(cfg)
    real_generate = trainer.engine.generate

    def generate_then_break(*args, **kwargs):
        batch = real_generate(*args, **kwargs)
        with torch.no_grad():
            trainer.model.get_output_embeddings().weight[:] = float("nan")
        return batch

    trainer.engine.generate = generate_then_break
    with pytest.raises(NonFiniteError) as err:
        trainer.step()
    assert str(err.value).startswith("non-finite values at rollout 1, hop old_logprobs: old_logprobs of completion")
