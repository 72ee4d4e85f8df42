"""KL estimators (Schulman k1 / k3) and how the losses add the KL term when beta > 0."""

from __future__ import annotations

import math

import pytest
import torch

from gspo.algorithms import kl_k1, kl_k3
from gspo.registry import KL_ESTIMATORS, LOSSES, RegistryError

SEEDS = range(5)


def test_registered_names():
    assert KL_ESTIMATORS.get("k1") is kl_k1
    assert KL_ESTIMATORS.get("k3") is kl_k3


@pytest.mark.parametrize("seed", SEEDS)
def test_k3_formula_nonnegative_and_zero_at_equality(seed):
    g = torch.Generator().manual_seed(seed)
    logp = -5 * torch.rand(6, 9, generator=g, dtype=torch.float64)
    ref = logp + torch.randn(6, 9, generator=g, dtype=torch.float64) * 10 ** (seed - 3)
    k3 = kl_k3(logp, ref)
    assert (k3 >= 0).all()
    for x, y, k in zip(logp.flatten().tolist(), ref.flatten().tolist(), k3.flatten().tolist(), strict=True):
        r = y - x
        assert math.isclose(k, math.exp(r) - r - 1, rel_tol=1e-6, abs_tol=1e-15)
    torch.testing.assert_close(kl_k1(logp, ref), logp - ref, rtol=0, atol=0)
    assert torch.equal(kl_k3(logp, logp), torch.zeros_like(logp))
    assert torch.equal(kl_k1(logp, logp), torch.zeros_like(logp))


@pytest.mark.parametrize("seed", SEEDS)
def test_both_estimators_have_the_exact_kl_as_expectation_under_the_policy(seed):
    # E_{y ~ pi}[k(y)] = KL(pi || pi_ref) for both estimators: checks the direction of the KL and the sign of r.
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(11, generator=g, dtype=torch.float64) * 2, -1)
    ref = torch.log_softmax(torch.randn(11, generator=g, dtype=torch.float64) * 2, -1)
    kl = float((logp.exp() * (logp - ref)).sum())
    reverse = float((ref.exp() * (ref - logp)).sum())
    for est in (kl_k1, kl_k3):
        expectation = float((logp.exp() * est(logp, ref)).sum())
        assert math.isclose(expectation, kl, rel_tol=1e-9)
        assert not math.isclose(expectation, reverse, rel_tol=1e-3)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    n, t = 5, 7
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    old = -2 * torch.rand(n, t, generator=g, dtype=torch.float64)
    logp = old + 0.1 * torch.randn(n, t, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return logp, old, adv, mask, ref, lengths


def _aggregate(name: str, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, l_max: int) -> float:
    """The aggregation each loss uses for its policy term, written as a loop over completions."""
    rows = [[float(x[i, t]) for t in range(x.shape[1]) if mask[i, t]] for i in range(x.shape[0])]
    if name in ("gspo", "gspo_token", "grpo"):
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if name == "dr_grpo":
        return sum(sum(r) for r in rows) / (len(rows) * l_max)
    if name == "dapo":
        return sum(sum(r) for r in rows) / int(lengths.sum())
    raise AssertionError(f"no aggregation reference for new loss {name!r}: add one here")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("name", LOSSES.names())
def test_kl_term_is_beta_times_kl_aggregated_like_the_policy_term(name, estimator):
    logp, old, adv, mask, ref, lengths = _batch(sum(map(ord, name)) % 100)
    l_max = 9
    base = LOSSES.get(name)(logp, old, adv, mask, max_completion_length=l_max)
    assert "kl" not in base.metrics
    beta = 0.37
    out = LOSSES.get(name)(logp, old, adv, mask, ref_logp=ref, beta=beta, kl_estimator=estimator,
                           max_completion_length=l_max)
    expected_kl = _aggregate(name, KL_ESTIMATORS.get(estimator)(logp, ref), mask, lengths, l_max)
    assert math.isclose(out.metrics["kl"], expected_kl, rel_tol=1e-9)
    assert math.isclose(float(out.loss), float(base.loss) + beta * expected_kl, rel_tol=1e-9, abs_tol=1e-12)

    # Junk in ref_logp's padding is ignored.
    junk_ref = torch.where(mask, ref, float("nan"))
    again = LOSSES.get(name)(logp, old, adv, mask, ref_logp=junk_ref, beta=beta, kl_estimator=estimator,
                             max_completion_length=l_max)
    assert math.isclose(float(again.loss), float(out.loss), rel_tol=1e-12)


def test_kl_errors_name_the_field():
    logp, old, adv, mask, ref, _ = _batch(0)
    with pytest.raises(ValueError, match="ref_logp"):
        LOSSES.get("gspo")(logp, old, adv, mask, beta=0.1)
    with pytest.raises(RegistryError, match="k3"):
        LOSSES.get("gspo")(logp, old, adv, mask, beta=0.1, ref_logp=ref, kl_estimator="k2")
    with pytest.raises(ValueError, match="beta"):
        LOSSES.get("gspo")(logp, old, adv, mask, beta=-1.0, ref_logp=ref)


def test_k3_stays_finite_far_from_the_reference():
    logp = torch.tensor([[-200.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    k = kl_k3(logp, ref)
    k.sum().backward()
    assert torch.isfinite(k).all() and torch.isfinite(logp.grad).all() and float(k[0, 0]) > 1e8
