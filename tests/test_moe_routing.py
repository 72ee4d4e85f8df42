"""Router discovery, recording, replay and router controls on real tiny transformers MoE models (CPU)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from gspo.config import MoEConfig as Cfg  # the trainer passes this config to apply_router_controls
from gspo.models.loading import tiny_config
from gspo.moe import (
    RoutingRecorder,
    RoutingRecords,
    RoutingReplay,
    apply_router_controls,
    find_routers,
    load_per_expert,
    routing_drift,
    routing_metrics,
)

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"]


def make_model(family, seed=0, dtype=torch.float32, **overrides):
    cfg = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation="eager")
    return model


def make_batch(vocab, b=4, s=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, s), generator=g)
    attn = torch.ones(b, s, dtype=torch.long)
    attn[0, :3] = 0  # left padding, as the rollout batches have
    attn[2, :5] = 0
    ids[attn == 0] = 0
    return ids, attn


def lm_loss(model, ids, attn):
    out = model(input_ids=ids, attention_mask=attn)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    m = attn[:, 1:].float()
    return -(logp * m).sum() / m.sum()


def record(model, ids, attn, **kw):
    with torch.no_grad(), RoutingRecorder(model, **kw) as rec:
        out = model(input_ids=ids, attention_mask=attn)
    return rec.records(), out.logits


@pytest.mark.parametrize("family", FAMILIES)
def test_family_routers_recorder_metrics_and_exact_self_replay(family):
    model = make_model(family)
    cfg = model.config
    routers = find_routers(model)
    sparse_layers = [i for i, layer in enumerate(model.model.layers)
                     if any(m is r.module for r in routers for m in layer.modules())]
    assert [r.layer for r in routers] == sparse_layers and len(routers) >= 1
    assert all(r.family.name == family and r.top_k == cfg.num_experts_per_tok for r in routers)

    ids, attn = make_batch(cfg.vocab_size)
    recs, logits = record(model, ids, attn)
    assert recs.mask.tolist() == attn.bool().tolist()
    k = routers[0].top_k
    for pos in range(len(routers)):
        valid = recs.valid_indices(pos)
        assert valid.shape == (int(attn.sum()), k)
        assert ((valid >= 0) & (valid < routers[0].num_experts)).all()
        assert (valid.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token
    metrics = routing_metrics(recs, routers[0].num_experts, k)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert 0 < metrics["moe/routing_entropy"] <= 1
    assert metrics["moe/tokens"] == float(attn.sum())

    # Replaying the model's own routing must reproduce its output bit for bit: the family's combine weights
    # (softmax/sigmoid, renormalization, scaling) are recomputed exactly as the router computes them.
    with torch.no_grad(), RoutingReplay(model, recs):
        replayed = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(replayed, logits)

    # Forcing other experts must change the output (the replay is really applied).
    shifted = [(t + 1) % routers[0].num_experts for t in recs.indices]
    with torch.no_grad(), RoutingReplay(model, shifted):
        other = model(input_ids=ids, attention_mask=attn).logits
    assert (other - logits).abs().max() > 1e-4


def test_find_routers_through_peft_wrapper():
    from peft import LoraConfig, get_peft_model

    model = make_model("qwen3_moe")
    n = len(find_routers(model))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    routers = find_routers(peft_model)
    assert len(routers) == n and [r.layer for r in routers] == list(range(n))
    ids, attn = make_batch(model.config.vocab_size)
    with torch.no_grad(), RoutingRecorder(peft_model) as rec:
        peft_model(input_ids=ids, attention_mask=attn)
    assert rec.records().mask.tolist() == attn.bool().tolist()


def test_find_routers_rejects_dense_model_and_names_families():
    with pytest.raises(ValueError, match="qwen3_moe"):
        find_routers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_recorder_completion_mask_and_stacked_calls():
    model = make_model("olmoe")
    ids, attn = make_batch(model.config.vocab_size, b=4, s=10)
    with torch.no_grad(), RoutingRecorder(model) as rec:
        model(input_ids=ids[:2], attention_mask=attn[:2])
        model(input_ids=ids[2:, 2:], attention_mask=attn[2:, 2:])  # shorter second call
    completion = torch.zeros(4, 10, dtype=torch.bool)
    completion[:, 6:] = True
    recs = rec.records(mask=completion)
    assert recs.indices[0].shape == (4, 10, 2)
    assert (recs.indices[0][2:, 8:] == -1).all()  # right-padded second call
    expected = attn.bool() & completion
    expected[2:, 8:] = False
    assert recs.mask.tolist() == expected.tolist()
    m = routing_metrics(recs)
    assert m["moe/tokens"] == float(expected.sum())
    assert load_per_expert(recs).sum(-1).tolist() == [2 * float(expected.sum())] * 2  # k per valid token
    whole, _ = record(model, ids, attn)
    # Same tokens, same routing, whatever the call split (first call: same positions).
    assert torch.equal(recs.indices[1][:2][recs.mask[:2]], whole.indices[1][:2][recs.mask[:2]])
    with pytest.raises(ValueError, match="mask shape"):
        rec.records(mask=torch.ones(4, 9, dtype=torch.bool))


def _train(model, ids, attn, steps, lr, replay_source=None):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    router_grad = []
    used = []
    for _ in range(steps):
        opt.zero_grad()
        with RoutingRecorder(model) as rec:
            if replay_source is None:
                loss = lm_loss(model, ids, attn)
            else:
                with RoutingReplay(model, replay_source):
                    loss = lm_loss(model, ids, attn)
        loss.backward()
        router_grad.append(sum(0.0 if r.module.weight.grad is None else float(r.module.weight.grad.abs().sum())
                               for r in find_routers(model)))
        used.append(rec.records())
        opt.step()
    return router_grad, used


def test_drift_positive_without_replay_zero_with_r2_and_router_still_learns():
    base = make_model("qwen3_moe", seed=3)
    ids, attn = make_batch(base.config.vocab_size, b=6, s=16)
    old, _ = record(base, ids, attn)  # π_old's routing (the old-logprob pass)

    free = copy.deepcopy(base)
    _train(free, ids, attn, steps=4, lr=2.0)
    new_free, _ = record(free, ids, attn)
    drift_free = routing_drift(old, new_free)["moe/routing_drift"]
    assert drift_free > 0.02, drift_free

    r2 = copy.deepcopy(base)
    router_before = [r.module.weight.detach().clone() for r in find_routers(r2)]
    grads, used = _train(r2, ids, attn, steps=4, lr=2.0, replay_source=old)
    assert all(g > 0 for g in grads)  # gradients reach the router through the replayed combine weights
    assert any(not torch.equal(b, r.module.weight) for b, r in zip(router_before, find_routers(r2)))
    for recs in used:  # every update forward used exactly π_old's experts
        assert routing_drift(old, recs)["moe/routing_drift"] == 0.0
    with torch.no_grad(), RoutingReplay(r2, old), RoutingRecorder(r2) as rec:
        r2(input_ids=ids, attention_mask=attn)
    after = routing_drift(old, rec.records())
    assert after["moe/routing_drift"] == 0.0
    assert after["moe/router_drift"] > 0  # the router itself moved; replay hid it from the experts


def test_replay_minibatch_select_and_layout_check():
    model = make_model("mixtral")
    ids, attn = make_batch(model.config.vocab_size, b=4, s=12)
    recs, logits = record(model, ids, attn)
    rows = [3, 1]
    with torch.no_grad(), RoutingReplay(model, recs.select(rows)):
        out = model(input_ids=ids[rows], attention_mask=attn[rows]).logits
    torch.testing.assert_close(out, logits[rows], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layout"), torch.no_grad(), RoutingReplay(model, recs):
        model(input_ids=ids[:, 1:], attention_mask=attn[:, 1:])


def test_replay_with_gradient_checkpointing_matches_plain_replay():
    # Forced experts that differ from the router's own choice, so a recompute that ignored the replay
    # would give different gradients.
    pos = torch.arange(4 * 12).reshape(4, 12, 1)
    forced = [torch.cat([(pos * 3 + lay) % 8, (pos * 3 + lay + 1) % 8], -1) for lay in range(2)]
    grads = []
    for checkpointing in (False, True):
        model = make_model("qwen3_moe", seed=5)
        ids, attn = make_batch(model.config.vocab_size)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with RoutingReplay(model, forced):
            lm_loss(model, ids, attn).backward()
        grads.append(torch.cat([r.module.weight.grad.flatten() for r in find_routers(model)]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_freeze_router_keeps_router_and_trains_experts():
    model = make_model("qwen2_moe")
    routers = apply_router_controls(model, Cfg(freeze_router=True))
    assert all(not p.requires_grad for r in routers for p in r.parameters())
    before_router = [r.module.weight.detach().clone() for r in routers]
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    before_experts = experts.detach().clone()
    ids, attn = make_batch(model.config.vocab_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lm_loss(model, ids, attn).backward()
    opt.step()
    assert all(torch.equal(b, r.module.weight) for b, r in zip(before_router, routers))
    assert (experts - before_experts).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_router_fp32_in_bf16_model(family):
    model = make_model(family, dtype=torch.bfloat16)
    routers = apply_router_controls(model, Cfg(router_fp32=True))
    assert all(p.dtype == torch.float32 for r in routers for p in r.parameters())
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids, attn = make_batch(model.config.vocab_size)
    with RoutingRecorder(model, keep_logits=True) as rec:
        loss = lm_loss(model, ids, attn)
    assert torch.isfinite(loss)
    assert all(lg.dtype == torch.float32 for lg in rec.records().logits)
    loss.backward()
    assert all(r.module.weight.grad is not None and r.module.weight.grad.dtype == torch.float32 for r in routers)


def test_router_controls_validate_options():
    model = make_model("deepseek_v3")
    with pytest.raises(ValueError, match="routing_replay"):
        apply_router_controls(model, Cfg(routing_replay="r4"))
    with pytest.raises(ValueError, match="z-loss applies to"):
        apply_router_controls(model, Cfg(router_z_loss_coef=1e-3))
    with pytest.raises(ValueError, match="aux_loss_coef"):
        apply_router_controls(model, Cfg(aux_loss_coef=-1.0))


def test_records_select_keeps_rows():
    recs = RoutingRecords.from_indices([torch.arange(12).reshape(3, 2, 2) % 4], num_experts=4)
    sub = recs.select([2, 0])
    assert torch.equal(sub.indices[0], recs.indices[0][[2, 0]])
    assert sub.mask.shape == (2, 2)
