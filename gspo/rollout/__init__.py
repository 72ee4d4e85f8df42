"""Rollout engines: prompts in, G completions per prompt out (see `gspo.rollout.base` for the contract).

Engines register in `gspo.registry.ROLLOUT_ENGINES`; `build_engine(section, run)` builds the one the `rollout`
config section names, from that section and the run's facts (`EngineInputs`).
Importing this package never imports vLLM (engines import it in their constructors).
"""

from __future__ import annotations

from typing import Any

from gspo.registry import ROLLOUT_ENGINES
from gspo.rollout import hf_generate, vllm_colocate, vllm_server  # registers the built-in engines
from gspo.rollout.base import EngineInputs, RolloutBatch, RolloutEngine, SamplingSpec


def build_engine(section: Any, run: EngineInputs) -> RolloutEngine:
    """Build the rollout engine `section.engine` names (unknown names list the valid ones) from its config
    section (`cfg.rollout`: each builder reads the keys it uses) and the run's facts."""
    return ROLLOUT_ENGINES.get(section.engine)(section, run)
