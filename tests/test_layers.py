"""The import layers and the no-cycle rule (pyproject.toml's [tool.importlinter] contracts) hold.

An upward import (e.g. gspo.rollout importing gspo.training) or an import cycle fails this test, so it fails
CI. The second test plants such an import in a copy of the package and checks the contracts catch it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = "Layers: a module imports only from its own layer or the ones below"
CYCLES = "No import cycles between sibling modules or packages, at any depth"


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports())"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=False,
                          timeout=120)


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{LAYERS} KEPT" in result.stdout and f"{CYCLES} KEPT" in result.stdout
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, planted, broken", [
    ("gspo/rollout/base.py", "import gspo.training.trainer", LAYERS),  # upward: rollout sits below training
    ("gspo/moe/routing.py", "import gspo.moe.metrics", CYCLES),  # a cycle: metrics reads routing's records
])
def test_a_planted_bad_import_breaks_a_contract(tmp_path, module, planted, broken):
    shutil.copytree(ROOT / "gspo", tmp_path / "gspo", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{planted}  # planted\n")
    result = lint_imports(tmp_path, pythonpath=tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert f"{broken} BROKEN" in result.stdout, result.stdout + result.stderr
