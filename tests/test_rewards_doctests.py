"""The built-in rewards' docstring examples run as tests (CI runs `pytest` over tests/ only)."""

import doctest
import importlib

import pytest

MODULES = ["gspo.rewards", "gspo_rewards.math", "gspo_rewards.format", "gspo_rewards.length",
           "gspo_rewards.language", "gspo_rewards.code", "gspo_rewards.reward_model", "gspo_rewards.sandbox"]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
