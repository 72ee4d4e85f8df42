"""Policy losses: GSPO (Zheng et al., arXiv 2507.18071) and the baselines it is compared with.

One call shape for every loss:

    fn(logp, old_logp, advantages, mask, *, clip_low, clip_high, ref_logp=None, beta=0.0,
       kl_estimator="k3", max_log_ratio=10.0, max_completion_length=None) -> LossOutput

    logp       [N, T]  log pi_theta of the completion tokens (carries the gradient)
    old_logp   [N, T]  log pi_old of the same tokens (treated as a constant)
    advantages [N]     one advantage per completion, or [N, T] per token where the loss supports it
    mask       [N, T]  float or bool, 1 / True on completion tokens, 0 / False on padding
    ref_logp   [N, T]  log pi_ref, needed only when beta > 0

`LossOutput.loss` is the scalar to MINIMIZE (-J + beta * KL). Each algorithm's name fixes its ratio level,
its aggregation and its advantage scale (`LossSpec`); there is no level x aggregation grid to get wrong.

Clipping. Every loss uses the PPO-style term min(ratio * adv, clip(ratio, 1 - clip_low, 1 + clip_high) * adv).
The min() picks the clipped term, and so stops the gradient, exactly when
    adv > 0 and ratio > 1 + clip_high   ("high"),   or   adv < 0 and ratio < 1 - clip_low   ("low");
otherwise it picks the unclipped term (equal to the clipped one inside the band). `_clipped_objective`
writes it as that `where`, which has the same value and gradient as min() without min()'s tie-splitting.

Deviations from the papers, all for numerical safety:
- log-ratios (sequence or token) are clamped to +-max_log_ratio (default 10) before exp(), so one
  far-off-policy completion gives a finite loss and gradient instead of inf / nan;
- padded positions are replaced with torch.where, never multiplied by the mask, so inf / nan there is harmless;
- a completion with no valid token has no likelihood and so no term: it is left out of "mean over completions".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gspo.algorithms.ratios import (
    DEFAULT_MAX_LOG_RATIO,
    as_bool_mask,
    masked_mean,
    masked_sum,
    sequence_log_ratio,
    token_log_ratio,
)
from gspo.registry import KL_ESTIMATORS, LOSSES

# Default clip ranges and where they come from.
GSPO_CLIP = (3e-4, 4e-4)  # GSPO paper, section 5.1
GRPO_CLIP = (0.2, 0.2)  # PPO / GRPO (DeepSeekMath) standard epsilon
DAPO_CLIP = (0.2, 0.28)  # DAPO "clip-higher"


@dataclass
class LossOutput:
    """loss: scalar tensor to minimize. metrics: python floats (see `METRIC_KEYS`), read from the device in one
    transfer when first asked for, not when the loss is computed: a transfer between forward and backward would
    leave the GPU idle while the host queues the backward pass. `fetch` adds the caller's own scalars (the loss,
    the gradient norm) to that one transfer."""

    loss: torch.Tensor
    stats: torch.Tensor  # [len(keys)], detached
    keys: tuple[str, ...]
    _metrics: dict[str, float] | None = field(default=None, repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        if self._metrics is None:
            self.fetch()
        return self._metrics

    def fetch(self, *extra: torch.Tensor) -> list[float]:
        """Read the metrics and the scalars `extra` from the device in one transfer; returns the extras' values."""
        dtype = torch.promote_types(self.stats.dtype, torch.float32)  # no value loses precision on the way:
        for e in extra:  # bf16 / fp16 read as fp32, float64 stays float64
            dtype = torch.promote_types(dtype, e.dtype)
        values = torch.cat([self.stats.to(dtype), *(e.detach().reshape(1).to(self.stats.device, dtype)
                                                    for e in extra)]).tolist()
        self._metrics = dict(zip(self.keys, values[:len(self.keys)], strict=True))
        return values[len(self.keys):]


# Keys every loss returns ("kl" is added when beta > 0).
METRIC_KEYS = (
    "clip_frac/low",  # fraction of valid TOKENS whose term is clipped (all tokens of a clipped sequence count)
    "clip_frac/high",
    "clip_frac_seq/low",  # fraction of COMPLETIONS with a clipped term
    "clip_frac_seq/high",
    "ratio/mean",  # the ratios the algorithm uses: s_i (sequence level) or w_it over valid tokens (token level)
    "ratio/min",
    "ratio/max",
)


# What a loss's batch sum is divided by, counted on the completion mask [N, T] (bool).
NORMALIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor | int]] = {
    "completions": lambda m: m.any(-1).sum(),
    "tokens": lambda m: m.sum(),
    "rows": lambda m: m.shape[0],
}


def shard_weight(local_count: float, global_count: float, world_size: int) -> float:
    """The factor one process's loss (computed on its shard of the batch, normalised by its own count) is
    multiplied by so that the gradients averaged over `world_size` processes (the all-reduce / reduce-scatter
    of data parallelism averages) equal the gradient of the loss on the whole batch:

        L = (1/C) sum_all x = sum_r (C_r/C) L_r,   mean_r (W C_r/C) grad L_r = grad L

    with C the batch's count (`LossSpec.batch_count`), C_r the shard's. A shard with nothing to count
    weighs 0; so does every shard of a batch with nothing to count (its loss is 0 anyway)."""
    if global_count <= 0:
        return 0.0
    return world_size * local_count / global_count


@dataclass(frozen=True)
class LossSpec:
    """A registered policy loss and the facts its name fixes.

    level: the level of the importance ratio, which sets the scale of a sensible clip range: "sequence"
           (s_i, within ~1e-3 of 1; gspo, and gspo_token whose s_it equals s_i in value) or "token" (w_it).
    clip_low, clip_high: the default clip range (also the defaults of `fn`).
    advantage: which group advantage the algorithm uses, a name in `gspo.registry.ADVANTAGES`.
    per_token_advantages: whether `fn` accepts [N, T] advantages.
    normalizer: what the loss divides its sum over the batch by, as a count `batch_count(mask)` gives:
           "completions" (completions with a valid token: a mean over completions), "tokens" (valid tokens:
           DAPO's token mean over the batch) or "rows" (every row: Dr.GRPO's N * L_max, L_max a constant).
           A batch split across processes is weighted by it (`shard_weight`).
    """

    name: str
    fn: Callable[..., LossOutput]
    level: str
    clip_low: float
    clip_high: float
    advantage: str
    per_token_advantages: bool
    description: str
    normalizer: str = "completions"

    def __post_init__(self) -> None:
        if self.level not in ("sequence", "token"):
            raise ValueError(f"LossSpec {self.name!r}: level must be 'sequence' or 'token', got {self.level!r}")
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"LossSpec {self.name!r}: normalizer must be one of {sorted(NORMALIZERS)}, "
                             f"got {self.normalizer!r}")

    def batch_count(self, mask: torch.Tensor) -> float:
        """The count this loss divides its batch sum by, for completions with `mask` [N, T]."""
        return float(NORMALIZERS[self.normalizer](as_bool_mask(mask)))

    def __call__(self, *args, **kwargs) -> LossOutput:
        return self.fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces


@dataclass
class _Inputs:
    """The cleaned batch and the call's options, as a loss's formula sees them."""

    fn: str  # the loss's name, for error messages
    logp: torch.Tensor  # [N, T], compute dtype, padding replaced by 0
    old_logp: torch.Tensor  # [N, T], detached, padding replaced by 0
    adv: torch.Tensor  # [N, 1] or [N, T], detached, compute dtype
    mask: torch.Tensor  # [N, T] bool
    rows: torch.Tensor  # [N] bool: completions with at least one valid token
    clip_low: float
    clip_high: float
    max_log_ratio: float
    max_completion_length: int | None


@dataclass
class _Terms:
    """What a loss's formula hands to the shared epilogue (`_finish`)."""

    objective: torch.Tensor  # scalar J
    aggregate: Callable[[torch.Tensor], torch.Tensor]  # [N, T] -> scalar, as J reduces its terms (KL uses it)
    low: torch.Tensor  # bool, clipped low: [N] per completion or [N, T] per token
    high: torch.Tensor
    ratios: torch.Tensor  # the ratios the algorithm uses, for the metrics
    ratio_mask: torch.Tensor  # where `ratios` are valid


def _prepare(fn: str, logp, old_logp, advantages, mask, clip_low, clip_high, max_log_ratio,
             max_completion_length, per_token_ok: bool) -> _Inputs:
    """Check shapes and ranges (errors name the function and the field) and clean the inputs."""
    if logp.dim() != 2:
        raise ValueError(f"{fn}: logp must be [N, T], got shape {list(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask)):
        if t.shape != logp.shape:
            raise ValueError(f"{fn}: {name} shape {list(t.shape)} must equal logp shape {list(logp.shape)}")
    n = logp.shape[0]
    if advantages.shape == logp.shape:
        if not per_token_ok:
            raise ValueError(
                f"{fn}: got per-token advantages of shape {list(advantages.shape)}; this loss takes one "
                "advantage per completion [N]. For per-token advantages use gspo_token (GSPO-token, Eq. 13-14)"
            )
    elif tuple(advantages.shape) != (n,):
        raise ValueError(f"{fn}: advantages must be [N]={[n]}" + (" or [N, T]" if per_token_ok else "")
                         + f", got shape {list(advantages.shape)}")
    if not (0.0 <= clip_low < 1.0) or clip_high < 0.0:
        raise ValueError(f"{fn}: need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    # bf16 / fp16 log-probs lose the ~1e-4 differences GSPO's clip band is made of: compute in >= fp32.
    dtype = logp.dtype if logp.dtype in (torch.float32, torch.float64) else torch.float32
    m = as_bool_mask(mask)
    lp = torch.where(m, logp.to(dtype), 0.0)
    old = torch.where(m, old_logp.detach().to(dtype), 0.0)
    adv = advantages.detach().to(dtype=dtype, device=logp.device)
    adv = torch.where(m, adv, 0.0) if adv.dim() == 2 else adv[:, None]
    return _Inputs(fn, lp, old, adv, m, m.any(-1), clip_low, clip_high, max_log_ratio, max_completion_length)


def _clipped_objective(ratio: torch.Tensor, inp: _Inputs, adv: torch.Tensor | None = None):
    """min(ratio * adv, clip(ratio, 1 - clip_low, 1 + clip_high) * adv), written with explicit masks.

    ratio, adv (default `inp.adv`): same (broadcast) shape -> term, is_low, is_high (bool). Where the clipped
    term wins, its value is a constant (the clamped ratio does not depend on theta), so the gradient is 0 there.
    """
    adv = inp.adv if adv is None else adv
    lo, hi = 1.0 - inp.clip_low, 1.0 + inp.clip_high
    is_high = (adv > 0) & (ratio > hi)
    is_low = (adv < 0) & (ratio < lo)
    clipped = ratio.detach().clamp(lo, hi) * adv
    term = torch.where(is_low | is_high, clipped, ratio * adv)
    return term, is_low, is_high


def _seq_then_batch_mean(x: torch.Tensor, inp: _Inputs) -> torch.Tensor:
    """(1/N) sum_i (1/|y_i|) sum_t x_it: token mean within a completion, then mean over completions."""
    return masked_mean(masked_mean(x, inp.mask, dim=-1), inp.rows)


def _kl_term(inp: _Inputs, ref_logp, beta, kl_estimator, aggregate) -> torch.Tensor | None:
    """beta > 0: the KL estimate aggregated like the policy term; None otherwise (nothing computed)."""
    fn = inp.fn
    if beta < 0:
        raise ValueError(f"{fn}: beta must be >= 0, got {beta}")
    if beta == 0:
        return None
    if ref_logp is None:
        raise ValueError(f"{fn}: beta={beta} > 0 needs ref_logp [N, T] (log-probs under the reference model)")
    if ref_logp.shape != inp.logp.shape:
        raise ValueError(f"{fn}: ref_logp shape {list(ref_logp.shape)} must equal logp shape {list(inp.logp.shape)}")
    ref = torch.where(inp.mask, ref_logp.detach().to(inp.logp.dtype), 0.0)
    kl_tok = KL_ESTIMATORS.get(kl_estimator)(inp.logp, ref)  # [N, T]
    return aggregate(kl_tok)


def _finish(t: _Terms, kl, beta, inp: _Inputs) -> LossOutput:
    """loss = -J + beta * KL, plus the metrics, fetched from the device in one transfer.

    Clip flags given per completion count for every valid token of the completion; flags given per token
    make their completion count as clipped when any of its tokens is.
    """
    loss = -t.objective if kl is None else -t.objective + beta * kl
    if t.low.dim() == 1:
        tok_low, tok_high, seq_low, seq_high = t.low[:, None] & inp.mask, t.high[:, None] & inp.mask, t.low, t.high
    else:
        tok_low, tok_high = t.low & inp.mask, t.high & inp.mask
        seq_low, seq_high = tok_low.any(-1), tok_high.any(-1)
    f = inp.logp.dtype
    n_tok = inp.mask.sum().clamp(min=1).to(f)
    n_seq = inp.rows.sum().clamp(min=1).to(f)
    r, ratio_mask = t.ratios.detach(), t.ratio_mask
    any_ratio = ratio_mask.any()
    stats = [  # in METRIC_KEYS' order
        tok_low.sum() / n_tok, tok_high.sum() / n_tok, (seq_low & inp.rows).sum() / n_seq,
        (seq_high & inp.rows).sum() / n_seq,
        torch.where(any_ratio, masked_mean(r, ratio_mask), 1.0),
        torch.where(any_ratio, torch.where(ratio_mask, r, float("inf")).min(), 1.0),
        torch.where(any_ratio, torch.where(ratio_mask, r, float("-inf")).max(), 1.0),
    ]
    keys = list(METRIC_KEYS)
    if kl is not None:
        stats.append(kl.detach())
        keys.append("kl")
    return LossOutput(loss=loss, stats=torch.stack([s.to(f) for s in stats]).detach(), keys=tuple(keys))


def _policy_loss(clip: tuple[float, float], *, per_token_advantages: bool):
    """Give a loss's formula, `formula(inp: _Inputs) -> _Terms`, the one call shape (module docstring).

    The returned function checks and cleans the inputs, runs the formula, adds the KL term aggregated like
    the objective, and computes the metrics; it keeps the formula's name and docstring. `clip` is its
    default (clip_low, clip_high).
    """

    def wrap(formula: Callable[[_Inputs], _Terms]) -> Callable[..., LossOutput]:
        fn = formula.__name__

        def loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                 clip_low: float = clip[0], clip_high: float = clip[1], ref_logp: torch.Tensor | None = None,
                 beta: float = 0.0, kl_estimator: str = "k3", max_log_ratio: float = DEFAULT_MAX_LOG_RATIO,
                 max_completion_length: int | None = None) -> LossOutput:  # L_max: used only by dr_grpo
            inp = _prepare(fn, logp, old_logp, advantages, mask, clip_low, clip_high, max_log_ratio,
                           max_completion_length, per_token_ok=per_token_advantages)
            terms = formula(inp)
            kl = _kl_term(inp, ref_logp, beta, kl_estimator, terms.aggregate)
            return _finish(terms, kl, beta, inp)

        loss.__name__ = loss.__qualname__ = fn
        loss.__doc__ = formula.__doc__
        return loss

    return wrap


# ----------------------------------------------------------------------------------------------------------
# Sequence level


@_policy_loss(GSPO_CLIP, per_token_advantages=False)
def gspo_loss(inp: _Inputs) -> _Terms:
    """GSPO (Eq. 5): J = (1/N) sum_i min( s_i adv_i, clip(s_i, 1 - clip_low, 1 + clip_high) adv_i ).

    s_i = exp(mean_t (logp_it - old_logp_it)) [N] (Eq. 7, `sequence_log_ratio`); one term per completion,
    mean over completions, so every completion weighs the same whatever its length. Gradient (Eq. 10) on
    unclipped terms: dJ/dlogp_it = adv_i s_i / (N |y_i|) -- every token of a completion the same weight.
    advantages: [N] only (per-token advantages belong to gspo_token).
    """
    log_s = sequence_log_ratio(inp.logp, inp.old_logp, inp.mask, max_log_ratio=inp.max_log_ratio)  # [N]
    s = torch.exp(log_s)  # [N]
    term, low, high = _clipped_objective(s, inp, adv=inp.adv[:, 0])  # [N]
    objective = masked_mean(term, inp.rows)  # over completions with a valid token
    return _Terms(objective, lambda x: _seq_then_batch_mean(x, inp), low, high, s, inp.rows)


@_policy_loss(GSPO_CLIP, per_token_advantages=True)
def gspo_token_loss(inp: _Inputs) -> _Terms:
    """GSPO-token (Eq. 13-14): s_it = sg[s_i] * pi_theta(y_it) / sg[pi_theta(y_it)],

    J = (1/N) sum_i (1/|y_i|) sum_t min( s_it adv_it, clip(s_it, 1 - clip_low, 1 + clip_high) adv_it ).
    Numerically s_it = s_i, and d s_it / d logp_it = s_i, so with one advantage per completion this is GSPO
    in value and gradient (Eq. 10); it exists for per-token advantages [N, T] (multi-turn, token shaping).
    The sequence ratio is taken from the clamped log s_i, so a huge log-ratio stays finite here too.
    """
    log_s = sequence_log_ratio(inp.logp, inp.old_logp, inp.mask, max_log_ratio=inp.max_log_ratio)  # [N]
    # [N, T], value log s_i. The token path carries gradient only where log s_i is inside the clamp, as in
    # gspo_loss (the clamp's gradient is 0 beyond it); else a clamped sequence would still push e^10 * adv.
    live = (log_s.detach().abs() < inp.max_log_ratio)[:, None]
    log_s_it = log_s.detach()[:, None] + torch.where(live, inp.logp - inp.logp.detach(), 0.0)
    s_it = torch.exp(log_s_it)  # [N, T]
    term, low, high = _clipped_objective(s_it, inp)  # [N, T]
    objective = _seq_then_batch_mean(term, inp)
    return _Terms(objective, lambda x: _seq_then_batch_mean(x, inp), low, high, torch.exp(log_s), inp.rows)


# ----------------------------------------------------------------------------------------------------------
# Token level: w_it = exp(clamp(logp_it - old_logp_it)), term_it = min(w adv, clip(w) adv); they differ
# only in how the [N, T] terms are reduced to a scalar.


def _token_level(inp: _Inputs, aggregate: Callable[[torch.Tensor], torch.Tensor]) -> _Terms:
    if inp.max_log_ratio <= 0:
        raise ValueError(f"{inp.fn}: max_log_ratio must be > 0, got {inp.max_log_ratio}")
    log_w = token_log_ratio(inp.logp, inp.old_logp, inp.mask).clamp(-inp.max_log_ratio, inp.max_log_ratio)
    w = torch.exp(log_w)  # [N, T], 1 on padding
    term, low, high = _clipped_objective(w, inp)  # [N, T]
    return _Terms(aggregate(term), aggregate, low, high, w, inp.mask)


@_policy_loss(GRPO_CLIP, per_token_advantages=True)
def grpo_loss(inp: _Inputs) -> _Terms:
    """GRPO: J = (1/N) sum_i (1/|y_i|) sum_t min(w_it adv_i, clip(w_it, 1 - eps, 1 + eps) adv_i).

    Token ratio w_it = pi_theta(y_it) / pi_old(y_it); token mean within a completion, mean over completions.
    """
    return _token_level(inp, lambda x: _seq_then_batch_mean(x, inp))


@_policy_loss(GRPO_CLIP, per_token_advantages=True)
def dr_grpo_loss(inp: _Inputs) -> _Terms:
    """Dr.GRPO: J = (1 / (N * L_max)) sum_i sum_t min(w_it adv_i, clip(w_it) adv_i), L_max = max_completion_length.

    Dividing by a constant instead of |y_i| removes GRPO's length bias; use with scale="none" advantages.
    """
    l_max = inp.max_completion_length
    if l_max is None or int(l_max) < 1:
        raise ValueError(
            f"{inp.fn}: max_completion_length (L_max, the constant the token sum is divided by) is required "
            f"and must be a positive int, got {l_max!r}"
        )
    longest = int(inp.mask.sum(-1).max()) if inp.mask.numel() else 0
    if longest > l_max:
        raise ValueError(f"{inp.fn}: a completion has {longest} valid tokens > max_completion_length={l_max}")
    denom = float(inp.mask.shape[0] * int(l_max))
    return _token_level(inp, lambda x: masked_sum(x, inp.mask) / denom)


@_policy_loss(DAPO_CLIP, per_token_advantages=True)
def dapo_loss(inp: _Inputs) -> _Terms:
    """DAPO: J = (1 / sum_i |y_i|) sum_i sum_t min(w_it adv_i, clip(w_it, 1 - 0.2, 1 + 0.28) adv_i).

    Token mean over the whole batch (every token weighs the same) with clip-higher. DAPO's dynamic
    sampling and overlong shaping live outside the loss.
    """
    return _token_level(inp, lambda x: masked_mean(x, inp.mask))


# ----------------------------------------------------------------------------------------------------------
# Registration: the name fixes level, aggregation, clip defaults and advantage scale.

for _spec in (
    LossSpec("gspo", gspo_loss, "sequence", *GSPO_CLIP, "std", False,
             "GSPO (Eq. 5): sequence ratio s_i, one term per completion, mean over completions"),
    LossSpec("gspo_token", gspo_token_loss, "sequence", *GSPO_CLIP, "std", True,
             "GSPO-token (Eq. 13-14): s_it = sg[s_i] pi/sg[pi], token mean then completion mean; per-token adv"),
    LossSpec("grpo", grpo_loss, "token", *GRPO_CLIP, "std", True,
             "GRPO: token ratio, token mean within a completion, mean over completions"),
    LossSpec("dr_grpo", dr_grpo_loss, "token", *GRPO_CLIP, "none", True,
             "Dr.GRPO: token ratio, token sum / (N * max_completion_length), mean-only advantages", "rows"),
    LossSpec("dapo", dapo_loss, "token", *DAPO_CLIP, "std", True,
             "DAPO: token ratio, token mean over the whole batch, clip-higher 0.2 / 0.28", "tokens"),
):
    LOSSES.register(_spec.name, _spec)
del _spec
