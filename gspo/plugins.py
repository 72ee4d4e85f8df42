"""Fill the registries: import every built-in module (and any user plugin module) so names resolve.

Modules register their losses, engines, tasks, rewards, model families and stages at import time (see
`gspo.registry`). `load_builtins()` imports all built-in ones; it is idempotent and cheap after the first
call. No module here imports vLLM at import time (the vLLM engine imports it when it is built).
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

# Every module that registers something. Order: cheap math first, the trainer (transformers) last.
BUILTIN_MODULES = (
    "gspo.algorithms",  # LOSSES, ADVANTAGES, KL_ESTIMATORS
    "gspo.rollout.vllm_colocate",  # ROLLOUT_ENGINES["vllm_colocate"] (vllm imported lazily)
    "gspo.rollout.hf_generate",  # ROLLOUT_ENGINES["hf_generate"]
    "gspo.rollout.vllm_server",  # ROLLOUT_ENGINES["vllm_server"] (the server is its own process)
    "gspo.data",  # TASKS
    "gspo.rewards",  # the reward contract and REWARDS
    "gspo_rewards",  # built-in reward functions (the repo's rewards/ folder)
    "gspo.models.loading",  # MODEL_FAMILIES
)
# Every module of these packages is imported too: a stage is added by dropping a module that registers its
# StageSpec into gspo/training/ (rl: trainer.py, sft.py, rejection.py, reward_model.py), nothing else.
BUILTIN_PACKAGES = ("gspo.training",)

_loaded = False


def load_builtins() -> None:
    """Import every built-in module so every registry is complete."""
    global _loaded
    if _loaded:
        return
    names = list(BUILTIN_MODULES)
    for package in BUILTIN_PACKAGES:
        path = importlib.import_module(package).__path__
        names += sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules(path))
    for name in names:
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
