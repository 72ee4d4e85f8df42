"""Per-token estimators of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, "Approximating KL
divergence", 2020). Used only when the loss's beta > 0; the GSPO paper trains without a KL term (beta = 0).

Shapes: logp, ref_logp [N, T] -> [N, T]. Padding is the caller's business: the losses aggregate these
values with the same masked reduction as their policy term, and clean padded positions first.
"""

from __future__ import annotations

import torch

from gspo.registry import KL_ESTIMATORS


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi_theta(y_t) - log pi_ref(y_t) = -r, with r = ref_logp - logp.

    Unbiased for KL(pi_theta || pi_ref) but high-variance, and negative on single tokens.
    """
    return logp - ref_logp


MAX_KL_LOG_RATIO = 50.0  # exp(50) ~ 5e21: finite in fp32 (overflow is at ~88)


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(r) - r - 1, with r = log pi_ref(y_t) - log pi_theta(y_t).

    Unbiased, low-variance and >= 0 for every token (exp(r) >= 1 + r); the estimator GRPO / DeepSeekMath
    use. expm1 keeps it exact near r = 0, where the three terms nearly cancel. r is clamped to ±50 (as the
    ratio's log is to ±10) so one token far below the reference cannot make the loss inf and the grads NaN.
    """
    r = (ref_logp - logp).clamp(-MAX_KL_LOG_RATIO, MAX_KL_LOG_RATIO)
    return torch.expm1(r) - r
