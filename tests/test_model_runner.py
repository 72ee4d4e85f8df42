"""`vllm_compat.use_v2_model_runner`: V2 on GPU unless the user's environment chose, nothing on CPU."""

import os

import pytest

from gspo.rollout import vllm_compat

pytestmark = pytest.mark.timeout(30)
ENVS = (vllm_compat.V2_RUNNER_ENV, vllm_compat.FLASHINFER_SAMPLER_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    # setenv first so monkeypatch records the original value (or its absence) and restores it afterwards, also
    # for what the function under test writes into os.environ: a leaked V2 request breaks later CPU engines.
    for k in ENVS:
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    return monkeypatch


def test_gpu_asks_for_v2_and_skips_the_flashinfer_probe(clean_env):
    assert vllm_compat.use_v2_model_runner(on_gpu=True, has_triton=True) is True
    assert os.environ[vllm_compat.V2_RUNNER_ENV] == "1"
    assert os.environ[vllm_compat.FLASHINFER_SAMPLER_ENV] == "0"


@pytest.mark.parametrize(("on_gpu", "has_triton"), [(False, True), (True, False)])
def test_cpu_or_no_triton_changes_nothing(clean_env, on_gpu, has_triton):
    assert vllm_compat.use_v2_model_runner(on_gpu=on_gpu, has_triton=has_triton) is False
    assert not any(k in os.environ for k in ENVS)


@pytest.mark.parametrize("choice", ["0", "1"])
def test_the_users_choice_wins(clean_env, choice):
    clean_env.setenv(vllm_compat.V2_RUNNER_ENV, choice)
    clean_env.setenv(vllm_compat.FLASHINFER_SAMPLER_ENV, "1")
    assert vllm_compat.use_v2_model_runner(on_gpu=True, has_triton=True) is False
    assert os.environ[vllm_compat.V2_RUNNER_ENV] == choice
    assert os.environ[vllm_compat.FLASHINFER_SAMPLER_ENV] == "1"
