"""The built-in rewards' docstring examples run as tests (CI runs `pytest` over tests/ only)."""

import doctest
import importlib
import pkgutil

import gspo_rewards
import pytest

# Every built-in reward module (found, not listed: a new module is covered without editing this file).
MODULES = ["gspo.rewards.text", *(f"gspo_rewards.{m.name}" for m in pkgutil.iter_modules(gspo_rewards.__path__))]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
