"""Properties of the group advantages (GSPO Eq. 6, Dr.GRPO) and the reward statistics."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from gspo.algorithms import group_advantages, group_reward_stats
from gspo.registry import ADVANTAGES, RegistryError

SEEDS = range(8)
EPS = 1e-4  # the default: TRL GRPOTrainer's constant


def random_rewards(seed: int, missing: float = 0.0):
    """rewards [B*G] float64 (prompt-major) with a few ties and, optionally, NaN (missing) entries."""
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, 7, (1,), generator=g))
    gs = int(torch.randint(2, 9, (1,), generator=g))
    r = torch.randn(b * gs, generator=g, dtype=torch.float64) * 3 + 1
    r = torch.where(torch.rand(b * gs, generator=g) < 0.2, torch.round(r), r)  # some ties
    if missing:
        r = torch.where(torch.rand(b * gs, generator=g, dtype=torch.float64) < missing, float("nan"), r)
    return r, gs


def groups(x: torch.Tensor, gs: int) -> list[list[float]]:
    return [x[i : i + gs].tolist() for i in range(0, len(x), gs)]


@pytest.mark.parametrize("seed", SEEDS)
def test_std_advantages_have_zero_mean_and_unit_sample_std_per_group(seed):
    r, gs = random_rewards(seed)
    adv = group_advantages(r, gs)
    for rg, ag in zip(groups(r, gs), groups(adv, gs), strict=True):
        assert abs(sum(ag)) < 1e-9
        if max(rg) == min(rg):
            assert ag == [0.0] * gs
            continue
        # The documented convention: the SAMPLE std (divisor G - 1), as torch.std / TRL use.
        sd = statistics.stdev(rg)
        assert math.isclose(statistics.stdev(ag), sd / (sd + EPS), rel_tol=1e-9)
        mean = statistics.fmean(rg)
        for x, a in zip(rg, ag, strict=True):
            assert math.isclose(a, (x - mean) / (sd + EPS), rel_tol=1e-9, abs_tol=1e-12)


def test_sample_std_convention_matches_torch_std():
    r = torch.tensor([0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 5.0, -1.0])
    adv = group_advantages(r, 4, eps=0.0).view(2, 4)
    rg = r.view(2, 4)
    expected = (rg - rg.mean(-1, keepdim=True)) / rg.std(-1, keepdim=True)  # unbiased, like TRL
    torch.testing.assert_close(adv, expected)
    # ... and not the population std (which would give a population std of exactly 1).
    assert not torch.allclose(adv.std(-1, unbiased=False), torch.ones(2))


@pytest.mark.parametrize("scale", ["std", "none"])
def test_all_equal_group_gives_exactly_zero(scale):
    # 0.1 * 3 and 0.1 * 7 are not exact in binary: a naive r - mean leaves ~1e-17, not 0.
    for gs in (3, 7, 16):
        for v in (0.1, 1.0 / 3, -2.7, 0.0, 1e9):
            r = torch.tensor([v] * gs + [0.0, 1.0] * (gs // 2) + [0.5] * (gs % 2), dtype=torch.float64)
            adv = group_advantages(r, gs, scale=scale)
            assert torch.equal(adv[:gs], torch.zeros(gs, dtype=torch.float64))
            assert adv[gs:].abs().sum() > 0


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("seed", SEEDS)
def test_missing_rewards_are_excluded_and_get_zero(seed, scale):
    r, gs = random_rewards(seed, missing=0.3)
    adv = group_advantages(r, gs, scale=scale)
    assert torch.isfinite(adv).all()
    for rg, ag in zip(groups(r, gs), groups(adv, gs), strict=True):
        present = [x for x in rg if not math.isnan(x)]
        for x, a in zip(rg, ag, strict=True):
            if math.isnan(x) or len(present) < 2 or max(present) == min(present):
                assert a == 0.0
            else:  # statistics over the present rewards only
                mean = statistics.fmean(present)
                den = statistics.stdev(present) + EPS if scale == "std" else 1.0
                assert math.isclose(a, (x - mean) / den, rel_tol=1e-9, abs_tol=1e-12)


def test_all_missing_group_gives_zeros_never_nan():
    nan = float("nan")
    r = torch.tensor([nan, nan, nan, 1.0, 2.0, nan, nan, 5.0, nan])
    for scale in ("std", "none"):
        adv = group_advantages(r, 3, scale=scale)
        assert torch.equal(adv[:3], torch.zeros(3))
        assert adv[3] < 0 < adv[4] and adv[5] == 0
        assert torch.equal(adv[6:], torch.zeros(3))  # one present reward: no baseline, no signal


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("seed", SEEDS)
def test_invariant_to_a_constant_added_per_group(seed, scale):
    r, gs = random_rewards(seed, missing=0.2)
    shift = (torch.randn(len(r) // gs, dtype=torch.float64) * 100).repeat_interleave(gs)
    torch.testing.assert_close(group_advantages(r + shift, gs, scale=scale), group_advantages(r, gs, scale=scale),
                               rtol=1e-7, atol=1e-7, equal_nan=False)


@pytest.mark.parametrize("seed", SEEDS)
def test_std_scale_is_invariant_to_positive_rescaling_and_none_scale_is_not(seed):
    r, gs = random_rewards(seed)
    torch.testing.assert_close(group_advantages(5 * r, gs, eps=1e-12), group_advantages(r, gs, eps=1e-12), rtol=1e-9,
                               atol=1e-9)
    torch.testing.assert_close(group_advantages(5 * r, gs, scale="none"), 5 * group_advantages(r, gs, scale="none"))


def test_groups_are_prompt_major_and_independent():
    a = torch.tensor([1.0, 0.0, 0.0, 0.0])
    b = torch.tensor([3.0, 3.0, 7.0, 9.0])
    both = group_advantages(torch.cat([a, b]), 4)
    torch.testing.assert_close(both, torch.cat([group_advantages(a, 4), group_advantages(b, 4)]))
    assert both[0] > 0 and (both[1:4] < 0).all()


def test_registry_estimators_are_the_scales_and_output_dtype():
    r = torch.tensor([1.0, 2.0, 4.0, 4.0, 0.0, 1.0])
    assert set(ADVANTAGES.names()) >= {"std", "none"}
    torch.testing.assert_close(ADVANTAGES.get("std")(r, 3), group_advantages(r, 3, scale="std"))
    torch.testing.assert_close(ADVANTAGES.get("none")(r, 3), group_advantages(r, 3, scale="none"))
    assert group_advantages(r.to(torch.float64), 3).dtype == torch.float64
    assert group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32  # integer rewards


def test_errors_name_the_problem():
    r = torch.zeros(6)
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(r, 4)
    with pytest.raises(RegistryError, match="std"):
        group_advantages(r, 3, scale="sdt")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        group_advantages(torch.tensor([0.0, 1.0, float("inf"), 1.0]), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 3), 3)


@pytest.mark.parametrize("seed", SEEDS)
def test_group_reward_stats_match_loop(seed):
    r, gs = random_rewards(seed, missing=0.25 if seed % 2 else 0.0)
    r[:gs] = 2.0  # at least one all-equal group
    stats = group_reward_stats(r, gs)
    zero, stds = 0, []
    for rg in groups(r, gs):
        present = [x for x in rg if not math.isnan(x)]
        flat = len(present) < 2 or max(present) == min(present)
        zero += flat
        stds.append(0.0 if flat else statistics.stdev(present))
    assert math.isclose(stats["frac_reward_zero_std"], zero / len(stds))
    assert math.isclose(stats["reward_std"], statistics.fmean(stds), rel_tol=1e-9, abs_tol=1e-12)
    assert set(stats) == {"frac_reward_zero_std", "reward_std"}
    assert all(isinstance(v, float) for v in stats.values())


def test_eps_default_is_trls_and_is_honoured():
    r = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # sample std 1/sqrt(3)
    sd = statistics.stdev([0.0, 1.0, 1.0, 0.0])
    assert float(group_advantages(r, 4)[1]) == pytest.approx(0.5 / (sd + 1e-4), rel=1e-12)
    assert float(group_advantages(r, 4, eps=0.25)[1]) == pytest.approx(0.5 / (sd + 0.25), rel=1e-12)
