"""Properties of the behaviour-policy correction (gspo/algorithms/behaviour.py): s_i, TIS weights, masking."""

from __future__ import annotations

import math

import pytest
import torch

from gspo.algorithms.behaviour import behaviour_correction, mismatch_mask, sequence_mismatch, tis_weights
from gspo.algorithms.losses import gspo_loss

pytestmark = pytest.mark.timeout(60)
SEEDS = range(6)


def batch(seed: int, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    n, t = 6, 9
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    old = -3 * torch.rand(n, t, generator=g, dtype=torch.float64)
    mu = old + spread * torch.randn(n, t, generator=g, dtype=torch.float64)
    return old, mu, mask, lengths


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_mismatch_is_the_per_sequence_mean_of_the_log_ratio(seed):
    old, mu, mask, lengths = batch(seed)
    junk = torch.where(mask, mu, torch.tensor(float("nan"), dtype=mu.dtype))  # padding never enters
    s = sequence_mismatch(old, junk, mask)
    for i in range(old.shape[0]):
        k = int(lengths[i])
        assert s[i].item() == pytest.approx(float((old[i, :k] - mu[i, :k]).sum()) / k, abs=1e-6)


def test_identical_policies_give_weight_one_and_mask_nothing():
    old, _, mask, _ = batch(0)
    c = behaviour_correction(old, old.clone(), mask, cap=2.0, bound=0.1)
    assert torch.equal(c.factor, torch.ones(old.shape[0]))
    assert c.metrics["tis/masked_frac"] == 0.0 and c.metrics["mismatch/max_abs"] == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_tis_weight_is_exp_capped(seed):
    s = torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 2
    w = tis_weights(s, cap=1.5)
    assert torch.all(w <= 1.5 + 1e-6) and torch.all(w > 0)
    below = s < math.log(1.5)
    assert torch.allclose(w[below], torch.exp(s[below]))
    assert torch.allclose(w[~below], torch.full_like(w[~below], 1.5))


def test_mask_keeps_exactly_the_sequences_within_the_bound():
    s = torch.tensor([-0.31, -0.1, 0.0, 0.1, 0.2999, 0.31])
    assert mismatch_mask(s, 0.3).tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("seed", SEEDS)
def test_factor_scales_each_sequence_term_of_the_gspo_loss(seed):
    """Weighting the advantage by w_i >= 0 weights sequence i's clipped term (module docstring): the loss with
    a one-hot factor equals that sequence's own term times the factor."""
    old, mu, mask, _ = batch(seed, spread=0.05)
    g = torch.Generator().manual_seed(seed + 7)
    logp = old + 0.01 * torch.randn(old.shape, generator=g, dtype=old.dtype)
    adv = torch.randn(old.shape[0], generator=g, dtype=old.dtype)
    n = old.shape[0]
    per_seq = []
    for i in range(n):
        onehot = torch.zeros(n, dtype=old.dtype)
        onehot[i] = 1.0
        per_seq.append(gspo_loss(logp, old, adv * onehot, mask, clip_low=3e-4, clip_high=4e-4).loss)
    c = behaviour_correction(old, mu, mask, cap=1.02, bound=0.5)
    total = gspo_loss(logp, old, adv * c.factor.to(old.dtype), mask, clip_low=3e-4, clip_high=4e-4).loss
    expected = sum(c.factor[i].item() * per_seq[i] for i in range(n))
    assert total.item() == pytest.approx(float(expected), rel=1e-9, abs=1e-12)


def test_metrics_count_clipped_and_masked_sequences():
    mask = torch.ones(3, 2, dtype=torch.bool)
    old = torch.zeros(3, 2)
    mu = torch.tensor([[0.0, 0.0], [-1.0, -1.0], [2.0, 2.0]])  # s = 0, 1, -2
    c = behaviour_correction(old, mu, mask, cap=2.0, bound=1.5)
    assert c.log_ratio.tolist() == [0.0, 1.0, -2.0]
    assert c.factor.tolist() == pytest.approx([1.0, 2.0, 0.0])  # e^1 capped at 2; |-2| > 1.5 masked
    assert c.metrics["tis/clipped_frac"] == pytest.approx(1 / 3)
    assert c.metrics["tis/masked_frac"] == pytest.approx(1 / 3)
    assert c.metrics["mismatch/max_abs"] == 2.0


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_invalid_cap_is_an_error(bad):
    with pytest.raises(ValueError, match="cap"):
        tis_weights(torch.zeros(2), bad)
