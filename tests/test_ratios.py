"""Properties of the token / sequence log-ratios and the masked reductions (GSPO Eq. 7)."""

from __future__ import annotations

import math

import pytest
import torch

from gspo.algorithms import masked_mean, masked_sum, sequence_log_ratio, token_log_ratio

SEEDS = range(6)
JUNK = (float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 50.0, -50.0)


def random_batch(seed: int, spread: float = 0.3):
    """logp, old_logp [N, T] float64, right-padded bool mask with >= 1 valid token per row, lengths [N]."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 9, (1,), generator=g))
    t = int(torch.randint(1, 12, (1,), generator=g))
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    old = -3 * torch.rand(n, t, generator=g, dtype=torch.float64)
    logp = old + spread * torch.randn(n, t, generator=g, dtype=torch.float64)
    return logp, old, mask, lengths


def fill_padding(x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """x with every padded position overwritten by a junk value (inf, -inf, nan, huge, moderate)."""
    g = torch.Generator().manual_seed(seed + 1000)
    junk = torch.tensor(JUNK, dtype=x.dtype)[torch.randint(0, len(JUNK), x.shape, generator=g)]
    return torch.where(mask, x, junk)


def left_align(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each right-padded row's valid prefix to the end of the row (left padding)."""
    t = x.shape[1]
    return torch.stack([torch.roll(row, int(t - n)) for row, n in zip(x, lengths, strict=True)])


def test_masked_reductions_match_loops_and_ignore_padding():
    for seed in SEEDS:
        x, _, mask, _ = random_batch(seed)
        junk = fill_padding(x, mask, seed)
        for dim in (None, 0, 1, -1):
            s, m = masked_sum(junk, mask, dim), masked_mean(junk, mask.float(), dim)
            assert torch.isfinite(s).all() and torch.isfinite(m).all()
            if dim is None:
                vals = [float(v) for v, k in zip(x.flatten(), mask.flatten(), strict=True) if k]
                assert math.isclose(float(s), sum(vals), rel_tol=1e-12, abs_tol=1e-12)
                assert math.isclose(float(m), sum(vals) / len(vals), rel_tol=1e-12, abs_tol=1e-12)
            elif dim in (1, -1):
                for i in range(x.shape[0]):
                    vals = [float(v) for v, k in zip(x[i], mask[i], strict=True) if k]
                    assert math.isclose(float(m[i]), sum(vals) / len(vals), rel_tol=1e-12, abs_tol=1e-12)


def test_masked_mean_of_all_padding_is_zero():
    x = torch.full((3, 4), float("nan"))
    mask = torch.zeros(3, 4)
    assert torch.equal(masked_mean(x, mask, dim=-1), torch.zeros(3))
    assert float(masked_mean(x, mask)) == 0.0
    assert float(masked_sum(x, mask)) == 0.0


def test_token_log_ratio_is_difference_and_zero_on_padding():
    for seed in SEEDS:
        logp, old, mask, _ = random_batch(seed)
        out = token_log_ratio(fill_padding(logp, mask, seed), fill_padding(old, mask, seed + 7), mask)
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
        torch.testing.assert_close(out[mask], (logp - old)[mask], rtol=0, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_ratio_is_geometric_mean_of_token_ratios(seed):
    logp, old, mask, lengths = random_batch(seed)
    s = torch.exp(sequence_log_ratio(logp, old, mask))
    for i in range(logp.shape[0]):
        prod = 1.0
        for t in range(int(lengths[i])):
            prod *= math.exp(float(logp[i, t]) - float(old[i, t]))  # token ratio w_it
        assert math.isclose(float(s[i]), prod ** (1.0 / int(lengths[i])), rel_tol=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_padding_never_changes_sequence_ratio_or_its_gradient(seed):
    logp, old, mask, lengths = random_batch(seed)
    clean = logp.clone().requires_grad_(True)
    ref = sequence_log_ratio(clean, old, mask)
    w = torch.randn(ref.shape, dtype=ref.dtype)  # a random downstream weighting of the ratios
    (ref * w).sum().backward()

    # Junk (inf, nan, huge) at padded positions of either input, as float or bool mask.
    dirty = fill_padding(logp, mask, seed).requires_grad_(True)
    out = sequence_log_ratio(dirty, fill_padding(old, mask, seed + 3), mask.double())
    (out * w).sum().backward()
    assert torch.equal(out, ref)
    assert torch.isfinite(dirty.grad).all()
    assert torch.equal(dirty.grad[mask], clean.grad[mask])
    assert torch.equal(dirty.grad[~mask], torch.zeros_like(dirty.grad[~mask]))

    # Left padding gives the same ratios and the same gradients at the same tokens.
    left_mask = left_align(mask, lengths)
    left = fill_padding(left_align(logp, lengths), left_mask, seed).requires_grad_(True)
    out_left = sequence_log_ratio(left, fill_padding(left_align(old, lengths), left_mask, seed), left_mask)
    (out_left * w).sum().backward()
    torch.testing.assert_close(out_left, ref, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(left.grad[left_mask], clean.grad[mask], rtol=1e-15, atol=1e-15)

    # Extra padding columns change nothing.
    wide = torch.cat([logp, torch.full((logp.shape[0], 5), float("nan"), dtype=logp.dtype)], dim=1)
    wide_old = torch.cat([old, torch.full((old.shape[0], 5), float("inf"), dtype=old.dtype)], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(mask.shape[0], 5, dtype=torch.bool)], dim=1)
    assert torch.equal(sequence_log_ratio(wide, wide_old, wide_mask), ref)


def test_sequence_ratio_of_empty_completion_is_zero_and_on_policy_is_zero():
    logp = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    out = sequence_log_ratio(fill_padding(logp, mask, 0), logp, mask)
    assert out[1] == 0.0
    assert torch.equal(sequence_log_ratio(logp, logp, mask), torch.zeros(3, dtype=torch.float64))


def test_huge_log_ratios_are_clamped_with_finite_gradient():
    logp = torch.tensor([[1e4, 1e4], [-1e4, -1e4], [0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(3, 2, dtype=torch.float64)
    mask = torch.ones(3, 2)
    out = sequence_log_ratio(logp, old, mask, max_log_ratio=10.0)
    assert out.tolist() == [10.0, -10.0, 0.25]
    torch.exp(out).sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert torch.equal(logp.grad[:2], torch.zeros(2, 2, dtype=torch.float64))  # beyond the clamp: no gradient
    assert logp.grad[2].abs().min() > 0


def test_bad_max_log_ratio_is_an_error_naming_it():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="max_log_ratio"):
        sequence_log_ratio(x, x, torch.ones(1, 2), max_log_ratio=0.0)


def test_import_needs_only_torch():
    import subprocess
    import sys

    code = (
        "import sys, gspo.algorithms\n"
        "heavy = {'transformers', 'trl', 'peft', 'accelerate', 'datasets', 'vllm', 'yaml'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
