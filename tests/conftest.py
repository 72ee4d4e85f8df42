"""Shared fixtures: a tiny MoE warmed up on the synthetic task once per test session."""

import contextlib
import logging
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process vLLM engine on CPU
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "tiny")


def tiny_config(name: str, output_dir, *overrides: str):
    """A tiny recipe with its output redirected into a test directory."""
    from gspo.config import load_config

    return load_config(os.path.join(TINY, name), [f"output_dir={output_dir}", "logging.progress=false", *overrides])


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory) -> str:
    """The tiny recipe's cold-start SFT (format learned, accuracy low): the RL tests start from it."""
    from gspo.training.sft import run_sft

    out = tmp_path_factory.mktemp("cold_start")
    return run_sft(tiny_config("cold_start.yaml", out))


@contextlib.contextmanager
def log_messages(logger_name: str):
    """The messages logged to `logger_name` inside the block (vLLM's loggers do not propagate to caplog)."""
    messages: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, log = _Collect(), logging.getLogger(logger_name)
    log.addHandler(handler)
    try:
        yield messages
    finally:
        log.removeHandler(handler)
