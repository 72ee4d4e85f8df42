"""Expert-health metric formulas on hand-built routing, the health tracker, drift, and the aux / z losses."""

import logging
import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from gspo.config import MoEConfig
from gspo.models.loading import tiny_config
from gspo.moe import (
    ROUTER_FAMILIES,
    ExpertHealthTracker,
    RoutingRecorder,
    RoutingRecords,
    load_balancing_loss,
    load_per_expert,
    moe_aux_losses,
    router_z_loss,
    routing_drift,
    routing_metrics,
)


def hand_records():
    # E = 4, k = 2, 10 tokens of which the last 2 are padding (mask False) routed to expert 3.
    # Layer 0 loads over the 8 valid tokens: [8, 4, 4, 0]; layer 1: [4, 4, 4, 4].
    l0 = [[0, 1]] * 4 + [[0, 2]] * 4 + [[3, 2]] * 2
    l1 = [[0, 1]] * 4 + [[2, 3]] * 4 + [[3, 2]] * 2
    mask = torch.tensor([True] * 8 + [False] * 2)
    uniform = torch.full((10, 4), 0.25)
    peaked = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(10, 4)
    return RoutingRecords.from_indices(
        [torch.tensor(l0), torch.tensor(l1)], num_experts=4, probs=[uniform, peaked], mask=mask
    )


def test_metric_formulas_on_known_loads():
    recs = hand_records()
    assert load_per_expert(recs).tolist() == [[8, 4, 4, 0], [4, 4, 4, 4]]
    m = routing_metrics(recs, num_experts=4, top_k=2)
    # layer 0: mean 4, max 8 -> 2; population std sqrt((16 + 0 + 0 + 16) / 4) = sqrt(8) -> cv sqrt(8)/4.
    assert m["moe/layer0/load_max_over_mean"] == pytest.approx(2.0)
    assert m["moe/layer0/load_cv"] == pytest.approx(math.sqrt(8) / 4)
    assert m["moe/layer0/dead_experts"] == 1.0  # expert 3 only got padding tokens
    assert m["moe/layer1/load_max_over_mean"] == pytest.approx(1.0)
    assert m["moe/layer1/load_cv"] == pytest.approx(0.0)
    assert m["moe/layer1/dead_experts"] == 0.0
    assert m["moe/layer0/entropy"] == pytest.approx(1.0)  # uniform router
    assert m["moe/layer1/entropy"] == pytest.approx(0.0, abs=1e-6)  # one-hot router
    assert m["moe/load_max_over_mean"] == pytest.approx(2.0)  # worst layer
    assert m["moe/load_cv"] == pytest.approx(math.sqrt(8) / 8)  # mean over layers
    assert m["moe/routing_entropy"] == pytest.approx(0.5)
    assert m["moe/dead_experts"] == 1.0
    assert m["moe/tokens"] == 8.0
    with pytest.raises(ValueError, match="top_k"):
        routing_metrics(recs, num_experts=4, top_k=3)


def test_routing_drift_is_set_based_and_masked():
    old = RoutingRecords.from_indices([torch.tensor([[0, 1], [2, 3], [0, 1]])], 4,
                                      mask=torch.tensor([True, True, False]))
    # token 0: same set in another order (overlap 1); token 1: one of two kept (0.5); token 2: padding.
    new = RoutingRecords.from_indices([torch.tensor([[1, 0], [2, 0], [2, 3]])], 4)
    d = routing_drift(old, new)
    assert d["moe/routing_drift"] == pytest.approx(1 - (1 + 0.5) / 2)
    assert d["moe/layer0/routing_drift"] == d["moe/routing_drift"]
    assert routing_drift(old, old)["moe/routing_drift"] == 0.0
    other_layout = RoutingRecords.from_indices([torch.tensor([[1, 0], [2, 0]])], 4)
    with pytest.raises(ValueError, match="layout"):
        routing_drift(old, other_layout)


def test_tracker_dead_window_and_alarm_once_per_crossing(caplog):
    tracker = ExpertHealthTracker(window=2, collapse_threshold=1.8)
    balanced = torch.tensor([[4.0, 4, 4, 4]])
    skewed = torch.tensor([[8.0, 4, 4, 0]])  # max/mean 2 >= 1.8, expert 3 dead
    with caplog.at_level(logging.WARNING, logger="gspo.moe"):
        out1 = tracker.update(skewed, step=1)
        out2 = tracker.update(skewed, step=2)
        out3 = tracker.update(balanced, step=3)
        out4 = tracker.update(skewed, step=4)
    assert [o["moe/dead_experts"] for o in (out1, out2, out3, out4)] == [1.0, 1.0, 0.0, 0.0]
    assert [o["moe/collapse_alarm"] for o in (out1, out2, out3, out4)] == [1.0, 1.0, 0.0, 1.0]
    warnings = [r for r in caplog.records if r.name == "gspo.moe" and r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "step 1" in warnings[0].getMessage() and "step 4" in warnings[1].getMessage()
    # Dead over the window: an expert idle in both of the last 2 rollouts.
    t = ExpertHealthTracker(window=2, collapse_threshold=100)
    assert t.update(torch.tensor([[1.0, 0, 3]]))["moe/dead_experts"] == 1.0  # expert 1
    assert t.update(torch.tensor([[0.0, 0, 4]]))["moe/dead_experts"] == 1.0  # expert 1; 0 was used last time
    assert t.update(torch.tensor([[0.0, 2, 2]]))["moe/layer0/dead_experts"] == 1.0  # expert 0 now, 1 revived
    assert t.update(torch.tensor([[5.0, 2, 2]]))["moe/dead_experts"] == 0.0
    with pytest.raises(ValueError, match="collapse_threshold"):
        ExpertHealthTracker(window=2, collapse_threshold=0.5)


def _records_from_logits(logits, k=2, mask=None):
    idx = logits.topk(k, dim=-1).indices
    mask = torch.ones(logits.shape[0], dtype=torch.bool) if mask is None else mask
    fam = ROUTER_FAMILIES.get("qwen3_moe")
    return RoutingRecords([0], [idx.detach()[None]], mask[None], logits.shape[-1], k,
                          logits=[logits], families=[fam], routers=[None])


def test_aux_loss_range_and_descent_rebalances():
    e, k, n = 8, 2, 64
    balanced = torch.zeros(n, e)
    collapsed = torch.zeros(n, e)
    collapsed[:, :2] = 12.0  # every token on experts 0 and 1 with ~all the probability
    assert load_balancing_loss(_records_from_logits(balanced)) == pytest.approx(k, rel=1e-4)
    assert load_balancing_loss(_records_from_logits(collapsed)) == pytest.approx(e, rel=1e-3)
    # Descending the aux loss alone (router logits as free parameters) must rebalance the load: the loss
    # has a real gradient through the router probabilities (a double softmax would flatten it).
    g = torch.Generator().manual_seed(0)
    logits = torch.nn.Parameter(collapsed.clone() * 0.3 + 0.5 * torch.randn(n, e, generator=g))
    opt = torch.optim.SGD([logits], lr=50.0)
    first = last = None
    for _ in range(60):
        recs = _records_from_logits(logits)
        loss = load_balancing_loss(recs)
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    imbalance = routing_metrics(_records_from_logits(logits.detach()))["moe/load_max_over_mean"]
    assert first > 0.8 * e and last < 0.5 * (first + k) and imbalance < 2.0


def test_aux_loss_matches_transformers_per_layer_and_ignores_padding():
    cfg = tiny_config("qwen3_moe")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    ids = torch.randint(5, cfg.vocab_size, (3, 9))
    attn = torch.ones(3, 9, dtype=torch.long)
    attn[1, :4] = 0
    with torch.no_grad(), RoutingRecorder(model, keep_logits=True) as rec:
        model(input_ids=ids, attention_mask=attn)
    recs = rec.records()
    ours = load_balancing_loss(recs)
    ref = torch.stack([
        load_balancing_loss_func((lg,), cfg.num_experts, cfg.num_experts_per_tok, attn) for lg in recs.logits
    ]).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_aux_loss_coef_changes_router_gradient():
    # Sizes pinned: the size of the aux term relative to the policy gradient depends on the init scale.
    cfg = tiny_config("qwen3_moe", hidden_size=64, initializer_range=0.02, num_experts=8, moe_intermediate_size=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    ids = torch.randint(5, cfg.vocab_size, (4, 16))
    attn = torch.ones_like(ids)

    def router_grad(coef):
        model.zero_grad()
        with RoutingRecorder(model, keep_logits=True) as rec:
            out = model(input_ids=ids, attention_mask=attn)
        logp = torch.log_softmax(out.logits[:, :-1], -1).gather(-1, ids[:, 1:, None])
        moe_cfg = MoEConfig(aux_loss_coef=coef)
        extra, metrics = moe_aux_losses(rec.records(), moe_cfg)
        (-logp.mean() + extra).backward()
        grads = torch.cat([layer.mlp.gate.weight.grad.flatten() for layer in model.model.layers])
        return grads, metrics

    g0, m0 = router_grad(0.0)
    g1, m1 = router_grad(1e-3)  # TRL's default coefficient
    assert "moe/aux_loss" not in m0 and m1["moe/aux_loss"] > 0
    rel = float((g1 - g0).norm() / g0.norm())
    # Measured here: ~0.12 at 1e-3; a double-softmax aux loss gives ~0.015 on the same batch.
    assert rel > 0.05, rel  # not inert at the coefficient people actually use


def test_z_loss_definition():
    e = 8
    zeros = torch.zeros(5, e)
    assert router_z_loss(_records_from_logits(zeros)) == pytest.approx(math.log(e) ** 2)
    # Shifting every logit by c shifts logsumexp by c (softmax unchanged, z-loss not).
    assert router_z_loss(_records_from_logits(zeros + 3.0)) == pytest.approx((math.log(e) + 3.0) ** 2)
    mask = torch.tensor([True, True, False, False, False])
    mixed = zeros.clone()
    mixed[2:] = 100.0  # padding rows must not count
    assert router_z_loss(_records_from_logits(mixed, mask=mask)) == pytest.approx(math.log(e) ** 2)
