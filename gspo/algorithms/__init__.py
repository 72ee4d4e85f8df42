"""GSPO math core: ratios, group advantages, policy losses, KL estimators.

Needs only torch. Importing this package registers the losses (`gspo.registry.LOSSES`), the advantage
estimators (`ADVANTAGES`: "std", "none") and the KL estimators (`KL_ESTIMATORS`: "k1", "k3").
docs/concepts.md maps every GSPO equation to the function here that computes it.
"""

from gspo.algorithms.advantages import group_advantages, group_reward_stats, mean_advantages, std_advantages
from gspo.algorithms.kl import kl_k1, kl_k3
from gspo.algorithms.losses import (
    METRIC_KEYS,
    LossOutput,
    LossSpec,
    dapo_loss,
    dr_grpo_loss,
    grpo_loss,
    gspo_loss,
    gspo_token_loss,
    shard_weight,
)
from gspo.algorithms.ratios import masked_mean, masked_sum, sequence_log_ratio, token_log_ratio
