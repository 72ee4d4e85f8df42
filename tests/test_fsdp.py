"""FSDP2 on CPU (gloo), two real processes: the sharded policy's update with each process's loss weighted by
`shard_weight` equals the one-process update on the whole batch, and the engine's copy gets the full weights
one tensor at a time."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from gspo.models.loading import build_tiny_model

LOSS_NAMES = ("gspo", "dapo")  # a mean over completions and a token mean over the whole batch
SEQ, PROMPT = 10, 4


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (5, SEQ), generator=g)
    lengths = torch.tensor([6, 1, 3, 5, 2])  # completion tokens per row: uneven, so shards count differently
    mask = torch.arange(SEQ - PROMPT)[None, :] < lengths[:, None]
    adv = torch.randn(5, generator=g)
    noise = 0.01 * torch.randn(5, SEQ - PROMPT, generator=g)
    return ids, mask, adv, noise


def _logp(model, ids):
    logits = model(input_ids=ids).logits[:, PROMPT - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, ids[:, PROMPT:, None]).squeeze(-1)


def _update(model, name, rows, world, group=None):
    """One optimizer step on `rows` of the batch, weighted for `world` processes; returns the loss value
    and the grad norm."""
    import torch.distributed as dist

    from gspo.algorithms import shard_weight
    from gspo.registry import LOSSES

    spec = LOSSES.get(name)
    ids, mask, adv, noise = _batch()
    # SGD: the step is linear in the gradient, so equal gradients give equal weights (Adam's first step,
    # g / (|g| + eps), would amplify float noise on near-zero gradients).
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    logp = _logp(model, ids[rows])
    old = logp.detach() + noise[rows]
    out = spec(logp, old, adv[rows], mask[rows], max_completion_length=SEQ)
    local = torch.tensor(spec.batch_count(mask[rows]))
    total = local.clone()
    if world > 1:
        dist.all_reduce(total)
    w = shard_weight(float(local), float(total), world)
    (out.loss * w).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    opt.step()
    value = torch.tensor(float(out.loss.detach()) * w / world)
    if world > 1:
        dist.all_reduce(value)
    return float(value), float(norm)


def _worker(rank, world, path, tmp):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from gspo.training.fsdp import copy_full_weights, shard_policy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        rows = [slice(0, 2), slice(2, 5)][rank]
        result = {}
        for name in LOSS_NAMES:
            model = shard_policy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
            loss, norm = _update(model, name, rows, world)
            engine = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            n = copy_full_weights(model, engine)
            result[name] = {"loss": loss, "norm": norm, "copied": n,
                            "weights": {k: v.clone() for k, v in engine.state_dict().items()}}
        if rank == 0:
            torch.save(result, os.path.join(tmp, "fsdp.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_process_fsdp2_update_equals_one_process(tmp_path):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model("qwen3_moe", tmp_path / "model")
    mp.start_processes(_worker, args=(2, path, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(tmp_path / "fsdp.pt")
    for name in LOSS_NAMES:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        before = {k: v.clone() for k, v in ref.state_dict().items()}
        loss, norm = _update(ref, name, slice(0, 5), 1)
        r = got[name]
        assert r["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7), name
        assert r["norm"] == pytest.approx(norm, rel=1e-4), name
        assert r["copied"] == len(ref.state_dict())
        # The two updates agree to 1e-4 of the largest update of each tensor (float summation order differs);
        # a wrongly weighted shard (a factor 2/5 or 3/5 off) misses by far more.
        moved = 0
        for k, v in ref.state_dict().items():
            step_ref, step_got = v - before[k], r["weights"][k] - before[k]
            scale = float(step_ref.abs().max())
            err = float((step_got - step_ref).abs().max())
            assert err <= 1e-4 * scale + 1e-7, (name, k, err, scale)
            moved += scale > 0
        assert moved > 0.5 * len(before), name  # the step changed the weights: the comparison means something
