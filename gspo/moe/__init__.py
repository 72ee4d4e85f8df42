"""Mixture-of-Experts support: router discovery, recording and replay (`gspo.moe.routing`), auxiliary losses
(`gspo.moe.losses`) and expert-health metrics (`gspo.moe.metrics`), importable from `gspo.moe` itself."""

from gspo.moe.routing import *  # noqa: F401,F403
from gspo.moe.routing import __all__  # noqa: F401
