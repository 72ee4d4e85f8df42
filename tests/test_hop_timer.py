"""HopTimer: each hop's time is its own: on a GPU it waits for the device at both edges of a hop, so
asynchronous kernels of one hop are not billed to the next one (issue seen: the update's last optimizer step
counted in the rollout hop)."""

from __future__ import annotations

import time

import pytest
import torch

from gspo.training.metrics_log import HopTimer


@pytest.mark.timeout(30)
def test_hop_waits_for_the_device_at_both_edges(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: events.append("sync"))
    timer = HopTimer()
    with timer("update"):
        events.append("work")
    assert events == ["sync", "work", "sync"]


@pytest.mark.timeout(30)
def test_no_device_wait_without_cuda_and_hops_add_up(monkeypatch):
    called = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: called.append(1))
    timer = HopTimer()
    with timer("rollout"):
        time.sleep(0.02)
    with timer("rollout"):  # a hop entered twice accumulates
        time.sleep(0.02)
    m = timer.metrics()
    assert not called
    assert m["timing/rollout"] >= 0.04
    assert m["timing/step"] == pytest.approx(m["timing/rollout"])
