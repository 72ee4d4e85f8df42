"""Properties of the policy losses: GSPO (Eq. 5, 10, 13-14) and the GRPO / Dr.GRPO / DAPO baselines.

The references below are slow python loops over completions and tokens that write each paper formula
literally (torch.min of the unclipped and clipped terms, autograd for the gradient), so a wrong
aggregation, ratio level, clip side or stop-gradient in the vectorized code shows up as a mismatch.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from gspo.algorithms import METRIC_KEYS, LossOutput, LossSpec, gspo_loss, gspo_token_loss
from gspo.registry import ADVANTAGES, LOSSES, RegistryError

SEEDS = range(5)
L_MAX = 16  # max_completion_length for dr_grpo; every batch below has T <= 12
JUNK = (float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 50.0, -50.0)


# ---------------------------------------------------------------------------------------------- helpers


def random_batch(seed: int, spread: float, *, per_token: bool = False, n=None, t=None):
    """logp, old_logp [N, T] float64, adv [N] (or [N, T]), right-padded bool mask (>= 1 token/row), lengths."""
    g = torch.Generator().manual_seed(seed)
    n = n or int(torch.randint(1, 8, (1,), generator=g))
    t = t or int(torch.randint(1, 12, (1,), generator=g))
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    old = -3 * torch.rand(n, t, generator=g, dtype=torch.float64)
    logp = old + spread * torch.randn(n, t, generator=g, dtype=torch.float64)
    shape = (n, t) if per_token else (n,)
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    return logp, old, adv, mask, lengths


def fill_padding(x: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    junk = torch.tensor(JUNK, dtype=x.dtype)[torch.randint(0, len(JUNK), x.shape, generator=g)]
    return torch.where(mask, x, junk)


def left_align(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    t = x.shape[1]
    return torch.stack([torch.roll(row, int(t - n)) for row, n in zip(x, lengths, strict=True)])


def run(name, logp, old, adv, mask, **kw):
    """Call a registered loss on a fresh leaf copy of logp; returns (LossOutput, grad wrt logp)."""
    leaf = logp.detach().clone().requires_grad_(True)
    out = LOSSES.get(name)(leaf, old, adv, mask, max_completion_length=L_MAX, **kw)
    out.loss.backward()
    out.loss = out.loss.detach()
    return out, leaf.grad


def spread_for(name: str) -> float:
    """Log-ratio noise that leaves some terms inside the clip band and pushes others out."""
    spec = LOSSES.get(name)
    return 3 * spec.clip_high if spec.level == "sequence" else 1.5 * spec.clip_high


# ------------------------------------------------------------------------------------- loop references


def _clip_min(ratio, a, cl, ch):
    return torch.min(ratio * a, torch.clamp(ratio, 1 - cl, 1 + ch) * a)


def reference(name, logp, old, adv, mask, cl, ch):
    """(loss, grad, per-token clipped-low flags, clipped-high flags, ratios used) from literal loops."""
    leaf = logp.detach().clone().requires_grad_(True)
    n, t_max = logp.shape
    per_token = adv.dim() == 2
    rows, tok_low, tok_high, ratios = [], {}, {}, []
    for i in range(n):
        idx = [t for t in range(t_max) if mask[i, t]]
        a_of = (lambda t, i=i: adv[i, t]) if per_token else (lambda t, i=i: adv[i])
        if name in ("gspo", "gspo_token"):
            s = torch.exp(sum(leaf[i, t] - old[i, t] for t in idx) / len(idx))  # Eq. 7
            ratios.append(float(s.detach()))
        if name == "gspo":  # Eq. 5: one term per completion
            a = adv[i]
            rows.append(_clip_min(s, a, cl, ch))
            for t in idx:
                tok_low[i, t], tok_high[i, t] = bool(a < 0 and s < 1 - cl), bool(a > 0 and s > 1 + ch)
            continue
        terms = []
        for t in idx:
            if name == "gspo_token":  # Eq. 13: s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]
                r = s.detach() * torch.exp(leaf[i, t] - leaf[i, t].detach())
            else:
                r = torch.exp(leaf[i, t] - old[i, t])  # token ratio w_it
                ratios.append(float(r.detach()))
            a = a_of(t)
            terms.append(_clip_min(r, a, cl, ch))
            tok_low[i, t], tok_high[i, t] = bool(a < 0 and r < 1 - cl), bool(a > 0 and r > 1 + ch)
        rows.append(sum(terms) / len(idx) if name in ("gspo_token", "grpo") else sum(terms))
    if name in ("gspo", "gspo_token", "grpo"):
        objective = sum(rows) / n  # mean over completions
    elif name == "dr_grpo":
        objective = sum(rows) / (n * L_MAX)  # token sum / constant N * L_max
    elif name == "dapo":
        objective = sum(rows) / int(mask.sum())  # token mean over the whole batch
    else:
        raise AssertionError(f"no loop reference for new loss {name!r}: add one to tests/test_losses.py")
    loss = -objective
    loss.backward()
    return float(loss.detach()), leaf.grad, tok_low, tok_high, ratios


def expected_metrics(mask, tok_low, tok_high, ratios):
    n = mask.shape[0]
    n_tok = int(mask.sum())
    seq_low = sum(any(v for (i, _), v in tok_low.items() if i == r) for r in range(n))
    seq_high = sum(any(v for (i, _), v in tok_high.items() if i == r) for r in range(n))
    return {
        "clip_frac/low": sum(tok_low.values()) / n_tok,
        "clip_frac/high": sum(tok_high.values()) / n_tok,
        "clip_frac_seq/low": seq_low / n,
        "clip_frac_seq/high": seq_high / n,
        "ratio/mean": sum(ratios) / len(ratios),
        "ratio/min": min(ratios),
        "ratio/max": max(ratios),
    }


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_honours_the_call_shape(name):
    spec = LOSSES.get(name)
    assert isinstance(spec, LossSpec) and spec.name == name
    assert spec.level in ("sequence", "token") and spec.advantage in ADVANTAGES
    assert spec.clip_low >= 0 and spec.clip_high >= 0 and spec.description
    params = inspect.signature(spec.fn).parameters
    assert list(params)[:4] == ["logp", "old_logp", "advantages", "mask"]
    assert params["clip_low"].default == spec.clip_low and params["clip_high"].default == spec.clip_high
    for opt, default in (("ref_logp", None), ("beta", 0.0), ("kl_estimator", "k3"), ("max_log_ratio", 10.0)):
        assert params[opt].default == default and params[opt].kind is inspect.Parameter.KEYWORD_ONLY

    logp, old, adv, mask, _ = random_batch(3, 0.05, n=6, t=5)
    out, grad = run(name, logp.float(), old.float(), adv.float(), mask.float())
    assert isinstance(out, LossOutput) and out.loss.dim() == 0 and out.loss.dtype == torch.float32
    assert set(out.metrics) == set(METRIC_KEYS)
    assert all(type(v) is float and math.isfinite(v) for v in out.metrics.values())
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # `fetch` reads the caller's scalars in the metrics' transfer: the same metrics, the extras' own values.
    fetched = spec.fn(logp.float(), old.float(), adv.float(), mask.float(), max_completion_length=L_MAX)
    assert fetched.fetch(fetched.loss, torch.tensor(2.5, dtype=torch.float64)) == [float(out.loss.detach()), 2.5]
    assert fetched.metrics == out.metrics

    # bool and float masks agree; calling the spec equals calling fn.
    same = spec.fn(logp, old, adv, mask, max_completion_length=L_MAX)
    assert float(same.loss.detach()) == float(spec(logp, old, adv, mask.double(), max_completion_length=L_MAX).loss.detach())

    # Per-token advantages: accepted where the spec says so, else an error pointing at gspo_token.
    per_tok = adv[:, None].expand_as(logp).contiguous()
    if spec.per_token_advantages:
        tok = spec.fn(logp, old, per_tok, mask, max_completion_length=L_MAX)
        assert math.isclose(float(tok.loss.detach()), float(same.loss.detach()), rel_tol=1e-12, abs_tol=1e-15)
    else:
        with pytest.raises(ValueError, match="gspo_token"):
            spec.fn(logp, old, per_tok, mask, max_completion_length=L_MAX)
    with pytest.raises(TypeError):
        spec.fn(logp, old, adv, mask, max_completion_length=L_MAX, clip_lo=0.1)  # a typo is not ignored
    with pytest.raises(ValueError, match="old_logp"):
        spec.fn(logp, old[:, :-1], adv, mask, max_completion_length=L_MAX)


@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("seed", SEEDS)
def test_on_policy_every_loss_is_group_baseline_reinforce(name, seed):
    logp, _, adv, mask, lengths = random_batch(seed, 0.0)
    out, grad = run(name, logp, logp.clone(), adv, mask)
    n, lens = len(adv), lengths.double()
    if name == "dapo":
        expected = -(adv * lens).sum() / lens.sum()
    elif name == "dr_grpo":
        expected = -(adv * lens).sum() / (n * L_MAX)
    else:  # ratio = 1 => loss = -mean(adv)
        expected = -adv.mean()
    assert math.isclose(float(out.loss), float(expected), rel_tol=1e-12, abs_tol=1e-15)
    for key in ("clip_frac/low", "clip_frac/high", "clip_frac_seq/low", "clip_frac_seq/high"):
        assert out.metrics[key] == 0.0
    assert out.metrics["ratio/mean"] == out.metrics["ratio/min"] == out.metrics["ratio/max"] == 1.0
    if name in ("gspo", "gspo_token", "grpo"):  # Eq. 10 at s_i = 1: -adv_i / (N |y_i|) on every valid token
        eq10 = -(adv / (n * lens))[:, None].expand_as(grad)
        torch.testing.assert_close(grad, torch.where(mask, eq10, 0.0), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_gradient_matches_eq10_off_policy(name):
    clipped_seen = unclipped_seen = 0
    for seed in range(12):
        logp, old, adv, mask, lengths = random_batch(seed, 1e-3, n=8)
        _, grad = run(name, logp, old, adv, mask)
        s = torch.exp(((logp - old) * mask).sum(-1) / lengths)
        clipped = ((adv > 0) & (s > 1 + 4e-4)) | ((adv < 0) & (s < 1 - 3e-4))
        # Eq. 10: dL/dlogp_it = -adv_i * s_i / (N |y_i|) on unclipped sequences, 0 on clipped ones.
        eq10 = torch.where(clipped, 0.0, -adv * s / (len(adv) * lengths))[:, None].expand_as(grad)
        torch.testing.assert_close(grad, torch.where(mask, eq10, 0.0), rtol=1e-10, atol=1e-15)
        clipped_seen += int(clipped.sum())
        unclipped_seen += int((~clipped).sum())
    assert clipped_seen > 5 and unclipped_seen > 5  # both branches were exercised


ADVANTAGE_SHAPES = [(name, False) for name in LOSSES.names()] + [
    (name, True) for name, spec in LOSSES.items() if spec.per_token_advantages
]


@pytest.mark.parametrize(("name", "per_token"), ADVANTAGE_SHAPES)
def test_loss_gradient_and_metrics_match_loop_reference(name, per_token):
    spec = LOSSES.get(name)
    clipped = 0
    for seed in SEEDS:
        logp, old, adv, mask, _ = random_batch(seed + 10, spread_for(name), per_token=per_token)
        out, grad = run(name, logp, old, adv, mask)
        loss, ref_grad, tok_low, tok_high, ratios = reference(name, logp, old, adv, mask, spec.clip_low,
                                                              spec.clip_high)
        assert math.isclose(float(out.loss), loss, rel_tol=1e-10, abs_tol=1e-14)
        torch.testing.assert_close(grad, torch.where(mask, ref_grad, 0.0), rtol=1e-9, atol=1e-14)
        for key, value in expected_metrics(mask, tok_low, tok_high, ratios).items():
            assert math.isclose(out.metrics[key], value, rel_tol=1e-9, abs_tol=1e-12), key
        clipped += sum(tok_low.values()) + sum(tok_high.values())
    assert clipped > 0  # the clipped branch was exercised


@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("seed", SEEDS)
def test_padding_never_changes_loss_or_gradient(name, seed):
    per_token = LOSSES.get(name).per_token_advantages
    logp, old, adv, mask, lengths = random_batch(seed, spread_for(name), per_token=per_token)
    clean, clean_grad = run(name, logp, old, adv, mask)

    # Junk (inf, -inf, nan, huge) at padded positions of logp, old_logp and per-token advantages.
    junk_adv = fill_padding(adv, mask, seed + 5) if per_token else adv
    dirty, dirty_grad = run(name, fill_padding(logp, mask, seed), fill_padding(old, mask, seed + 1), junk_adv,
                            mask.double())
    assert float(dirty.loss) == float(clean.loss) and dirty.metrics == clean.metrics
    assert torch.equal(dirty_grad, clean_grad) and torch.equal(dirty_grad[~mask], torch.zeros_like(dirty_grad[~mask]))

    # Left padding: same loss, same gradient at the same tokens.
    lmask = left_align(mask, lengths)
    ladv = left_align(adv, lengths) if per_token else adv
    left, left_grad = run(name, fill_padding(left_align(logp, lengths), lmask, seed),
                          fill_padding(left_align(old, lengths), lmask, seed), ladv, lmask)
    assert math.isclose(float(left.loss), float(clean.loss), rel_tol=1e-13, abs_tol=1e-15)
    torch.testing.assert_close(left_grad[lmask], clean_grad[mask], rtol=1e-12, atol=1e-15)

    # Extra padding columns change nothing.
    pad = torch.full((logp.shape[0], 3), float("nan"), dtype=logp.dtype)
    wide_mask = torch.cat([mask, torch.zeros(mask.shape[0], 3, dtype=torch.bool)], 1)
    wide_adv = torch.cat([adv, pad], 1) if per_token else adv
    wide, wide_grad = run(name, torch.cat([logp, pad], 1), torch.cat([old, -pad.abs()], 1), wide_adv, wide_mask)
    assert math.isclose(float(wide.loss), float(clean.loss), rel_tol=1e-13, abs_tol=1e-15)
    torch.testing.assert_close(wide_grad[:, : logp.shape[1]], clean_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
@pytest.mark.parametrize("seed", SEEDS)
def test_clipping_acts_per_sequence_and_one_sided(name, seed):
    logp, _, _, mask, lengths = random_batch(seed, 0.0, n=6)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    _, base_grad = run(name, logp, logp.clone(), adv, mask)
    n = len(adv)
    for j, delta, zeroed in (
        (0, +0.01, True),  # adv > 0, s > 1 + eps_high: clipped
        (0, -0.01, False),  # adv > 0, s < 1 - eps_low: unclipped (min picks s * adv), still gets gradient
        (1, -0.01, True),  # adv < 0, s < 1 - eps_low: clipped
        (1, +0.01, False),  # adv < 0, s > 1 + eps_high: unclipped
    ):
        old = logp.clone()
        old[j] -= delta  # log s_j = delta on every valid token of completion j only
        out, grad = run(name, logp, old, adv, mask)
        others = torch.arange(n) != j
        assert torch.equal(grad[others], base_grad[others])  # other completions untouched
        if zeroed:
            assert torch.equal(grad[j], torch.zeros_like(grad[j]))
            assert out.metrics["clip_frac_seq/high" if adv[j] > 0 else "clip_frac_seq/low"] == 1 / n
            tok_key = "clip_frac/high" if adv[j] > 0 else "clip_frac/low"
            assert math.isclose(out.metrics[tok_key], int(lengths[j]) / int(lengths.sum()))
        else:
            s_j = math.exp(delta)
            eq10 = torch.full_like(grad[j], -float(adv[j]) * s_j / (n * int(lengths[j])))
            torch.testing.assert_close(grad[j], torch.where(mask[j], eq10, 0.0), rtol=1e-10, atol=0)
            assert all(out.metrics[k] == 0.0 for k in METRIC_KEYS if k.startswith("clip_frac"))


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_token_equals_gspo_for_per_sequence_advantages(seed):
    logp, old, adv, mask, _ = random_batch(seed, 1e-3)
    seq, seq_grad = run("gspo", logp, old, adv, mask)
    for a in (adv, adv[:, None].expand_as(logp).contiguous()):
        tok, tok_grad = run("gspo_token", logp, old, a, mask)
        assert math.isclose(float(tok.loss), float(seq.loss), rel_tol=1e-12, abs_tol=1e-15)
        torch.testing.assert_close(tok_grad, seq_grad, rtol=1e-10, atol=1e-15)
        assert tok.metrics == pytest.approx(seq.metrics, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", SEEDS)
def test_gspo_token_with_per_token_advantages_is_not_gspo_with_their_mean(seed):
    logp, old, adv, mask, _ = random_batch(seed, 1e-4, per_token=True, n=4, t=6)
    mask[:, :2] = True  # >= 2 tokens per completion, so the advantages really vary within one
    tok, tok_grad = run("gspo_token", logp, old, adv, mask)
    mean_adv = (adv * mask).sum(-1) / mask.sum(-1)
    _, seq_grad = run("gspo", logp, old, mean_adv, mask)
    loss, ref_grad, *_ = reference("gspo_token", logp, old, adv, mask, 3e-4, 4e-4)
    assert math.isclose(float(tok.loss), loss, rel_tol=1e-10, abs_tol=1e-14)
    torch.testing.assert_close(tok_grad, torch.where(mask, ref_grad, 0.0), rtol=1e-9, atol=1e-14)
    assert not torch.allclose(tok_grad, seq_grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", LOSSES.names())
def test_huge_log_ratios_give_finite_loss_and_gradients(name):
    logp, old, adv, mask, _ = random_batch(1, 0.0, n=6, t=5)
    old = old.clone()
    old[0] += 1e4
    old[1] -= 1e4
    old[2, 0] += 1e4  # one token far off
    old[3, 0] -= 1e4
    for a in (adv, -adv):
        for dtype in (torch.float32, torch.float64):
            out, grad = run(name, logp.to(dtype), old.to(dtype), a.to(dtype), mask)
            assert math.isfinite(float(out.loss)) and torch.isfinite(grad).all()
            assert all(math.isfinite(v) for v in out.metrics.values())


def test_gspo_token_equals_gspo_in_gradient_beyond_the_log_ratio_clamp():
    logp, old, adv, mask, _ = random_batch(3, 1e-3, n=6, t=5)
    old = old.clone()
    old[0] -= 20.0  # log s = +20: clamped at 10 (negative advantage keeps the unclipped term)
    old[1] += 20.0  # log s = -20
    adv = adv.clone()
    adv[0], adv[1] = -1.0, 1.0
    out_s, grad_s = run("gspo", logp, old, adv, mask)
    out_t, grad_t = run("gspo_token", logp, old, adv, mask)
    assert torch.allclose(grad_t, grad_s, atol=1e-6) and float(grad_s[:2].abs().max()) == 0.0
    assert math.isclose(float(out_t.loss), float(out_s.loss), rel_tol=1e-6)


def test_low_precision_inputs_are_computed_in_float32():
    """bf16 logprobs (a bf16 policy) are upcast before the log-ratio, exp and clip: the loss and ratios equal
    those of the same values in float32. Computed in bf16, the ratios near 1 would round to multiples of 2^-7
    (1.002 -> 1.0), which the ratio comparison below sees."""
    logp, old, adv, mask, _ = random_batch(2, 2e-2, n=5, t=7)
    lp, od, ad = logp.bfloat16(), old.bfloat16(), adv.bfloat16()
    for fn in (gspo_loss, gspo_token_loss):
        ref = fn(lp.float(), od.float(), ad.float(), mask, clip_low=0.2, clip_high=0.2)
        low = fn(lp, od, ad, mask, clip_low=0.2, clip_high=0.2)
        assert low.loss.dtype == torch.float32
        assert math.isclose(float(low.loss), float(ref.loss), rel_tol=1e-6, abs_tol=1e-9)
        for key in ("ratio/min", "ratio/max", "ratio/mean"):
            assert math.isclose(low.metrics[key], ref.metrics[key], rel_tol=1e-6), key
    # the inputs really carry ratios that bf16 arithmetic could not hold
    s = ref.metrics["ratio/max"]
    assert abs(s - 1) > 2e-3 and float(torch.tensor(s).bfloat16()) != s


def test_empty_completion_has_no_term():
    logp, old, adv, mask, _ = random_batch(4, 1e-3, n=5, t=6)
    mask[2] = False
    for name in ("gspo", "gspo_token", "grpo"):
        with_empty, grad = run(name, logp, old, adv, mask)
        keep = torch.arange(5) != 2
        without, grad_without = run(name, logp[keep], old[keep], adv[keep], mask[keep])
        assert math.isclose(float(with_empty.loss), float(without.loss), rel_tol=1e-12)
        torch.testing.assert_close(grad[keep], grad_without)
        assert with_empty.metrics == pytest.approx(without.metrics)


def test_errors_name_the_field_and_choices():
    logp, old, adv, mask, _ = random_batch(0, 0.0, n=3, t=4)
    with pytest.raises(ValueError, match="max_completion_length"):
        LOSSES.get("dr_grpo").fn(logp, old, adv, mask)
    with pytest.raises(ValueError, match="max_completion_length=2"):
        LOSSES.get("dr_grpo").fn(logp, old, adv, torch.ones(3, 4), max_completion_length=2)
    with pytest.raises(ValueError, match=r"gspo_loss: advantages"):
        gspo_loss(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="clip_low"):
        gspo_loss(logp, old, adv, mask, clip_low=1.5)
    with pytest.raises(RegistryError, match="gspo_token"):
        LOSSES.get("gspo-token")


def test_names_fix_level_clip_and_advantage_scale():
    # Paper facts (gspo-reference.md): GSPO clip 3e-4 / 4e-4 (sec. 5.1), GRPO 0.2, DAPO clip-higher 0.2 / 0.28,
    # Dr.GRPO drops the std division.
    facts = {
        "gspo": ("sequence", 3e-4, 4e-4, "std", False),
        "gspo_token": ("sequence", 3e-4, 4e-4, "std", True),
        "grpo": ("token", 0.2, 0.2, "std", True),
        "dr_grpo": ("token", 0.2, 0.2, "none", True),
        "dapo": ("token", 0.2, 0.28, "std", True),
    }
    for name, fact in facts.items():
        s = LOSSES.get(name)
        assert (s.level, s.clip_low, s.clip_high, s.advantage, s.per_token_advantages) == fact, name


# ------------------------------------------------------------------------- a batch split across processes


@pytest.mark.timeout(60)
@pytest.mark.parametrize("beta", [0.0, 0.1])
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("seed", range(4))
def test_shards_weighted_by_their_count_give_the_whole_batch_gradient(name, seed, beta):
    """Data parallelism: each process computes the loss on its rows, the gradients are averaged. Weighted by
    `shard_weight` (the loss's own normaliser), the average equals the gradient of the whole batch's loss,
    for every registered loss (sequence mean, token mean over the batch, Dr.GRPO's constant), uneven shards
    and a shard whose only completion is empty included."""
    from gspo.algorithms import shard_weight

    spec = LOSSES.get(name)
    logp, old, adv, mask, _ = random_batch(seed, spread_for(name), n=7, t=9)
    mask[3] = False  # an empty completion (no term, no token) in the middle
    ref = old - 0.05 * torch.rand_like(old)
    full, g_full = run(name, logp, old, adv, mask, **({"ref_logp": ref, "beta": beta} if beta else {}))
    for cuts in ([0, 3, 7], [0, 1, 3, 4, 7], [0, 7, 7]):  # 2, 4 (one holding only the empty row), 2 (one empty)
        world = len(cuts) - 1
        total = spec.batch_count(mask)
        g_dist = torch.zeros_like(logp)
        loss_dist = 0.0
        for r in range(world):
            rows = slice(cuts[r], cuts[r + 1])
            w = shard_weight(spec.batch_count(mask[rows]), total, world)
            if cuts[r] == cuts[r + 1]:
                assert w == 0.0
                continue
            kw = {"ref_logp": ref[rows], "beta": beta} if beta else {}
            out, g = run(name, logp[rows], old[rows], adv[rows], mask[rows], **kw)
            g_dist[rows] += w * g / world
            loss_dist += w * float(out.loss) / world
        torch.testing.assert_close(g_dist, g_full, rtol=1e-9, atol=1e-12, msg=f"{name} cuts={cuts}")
        assert loss_dist == pytest.approx(float(full.loss), rel=1e-9, abs=1e-12), (name, cuts)


@pytest.mark.timeout(60)
def test_normalizers_count_what_the_losses_divide_by():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    counts = {name: LOSSES.get(name).batch_count(mask) for name in LOSSES}
    assert counts == {"gspo": 2.0, "gspo_token": 2.0, "grpo": 2.0, "dr_grpo": 3.0, "dapo": 3.0}
    with pytest.raises(ValueError, match="normalizer must be one of"):
        LossSpec("x", gspo_loss, "sequence", 0.1, 0.1, "std", False, "x", "sequences")
