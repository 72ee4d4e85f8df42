"""Fill the registries: import every built-in module (and any user plugin module) so names resolve.

Modules register their losses, engines, tasks, rewards, model families and stages at import time (see
`gspo.registry`). `load_builtins()` imports all built-in ones; it is idempotent and cheap after the first
call. No module here imports vLLM at import time (the vLLM engine imports it when it is built).
"""

from __future__ import annotations

import importlib
import sys

# Every module that registers something. Order: cheap math first, the trainer (transformers) last.
BUILTIN_MODULES = (
    "gspo.algorithms",  # LOSSES, ADVANTAGES, KL_ESTIMATORS
    "gspo.rollout.vllm_colocate",  # ROLLOUT_ENGINES["vllm_colocate"] (vllm imported lazily)
    "gspo.rollout.hf_generate",  # ROLLOUT_ENGINES["hf_generate"]
    "gspo.data",  # TASKS
    "gspo.rewards",  # the reward contract and REWARDS
    "gspo_rewards",  # built-in reward functions (the repo's rewards/ folder)
    "gspo.models.loading",  # MODEL_FAMILIES
    "gspo.training.trainer",  # STAGES["rl"]
    "gspo.training.sft",  # STAGES["sft"]
    "gspo.training.rejection",  # STAGES["rejection_sampling"]
    "gspo.training.reward_model",  # STAGES["reward_model"]
)

_loaded = False


def load_builtins() -> None:
    """Import every built-in module so every registry is complete."""
    global _loaded
    if _loaded:
        return
    for name in BUILTIN_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            reason = f"{type(e).__name__}: {e}"
            raise ImportError(f"gspo cannot import its built-in module {name!r}: {reason}") from e
    _loaded = True


def load_plugins(modules: list[str] | tuple[str, ...], search_dirs: list[str] | tuple[str, ...] = ()) -> None:
    """Import user modules (the config's `plugins`) so their registrations take effect.

    `search_dirs` (e.g. the current directory and the config file's folder) are appended to sys.path first:
    the `gspo` console script, unlike `python -m`, does not put the current directory on it.
    """
    for d in search_dirs:
        if d not in sys.path:
            sys.path.append(d)
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"plugin module {name!r} cannot be imported: {type(e).__name__}: {e}") from e
