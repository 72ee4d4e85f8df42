"""Built-in reward functions (installed as `gspo_rewards`). Importing this package registers them all in
`gspo.registry.REWARDS`; optional dependencies (math-verify, transformers) are imported lazily."""

from . import code, format, language, length, math, reward_model, synthetic  # noqa: F401
