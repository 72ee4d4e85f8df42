"""gspo.devices.to_device: same values on the target device; on a GPU, the update's inputs (prompts, masks, the
routing rows) reach it without a host-device synchronisation (`torch.cuda.set_sync_debug_mode("error")` raises
on one). The GPU part is skipped where there is no CUDA device (CI is CPU-only)."""

from __future__ import annotations

import pytest
import torch

from gspo.devices import to_device
from gspo.moe.routing import RoutingRecords
from gspo.training.logprobs import build_inputs


def test_same_device_is_the_tensor_itself_and_values_survive():
    t = torch.arange(6).reshape(2, 3)
    assert to_device(t, "cpu") is t
    assert torch.equal(to_device(t.float(), torch.device("cpu")), t.float())


def test_build_inputs_left_pads_prompts_and_counts_positions_over_real_tokens():
    """The layout the update and π_old passes share (written by hand): prompts left-padded to P (or
    prompt_len), completions right-padded, positions counting real tokens only; row i uses prompt i // G."""
    ids = torch.tensor([[20, 21, 22], [23, 24, 0], [25, 0, 0], [26, 27, 28]])
    mask = (ids > 0).float()
    input_ids, attn, pos, p_len = build_inputs([[5, 6], [7]], ids, mask, group_size=2, pad_token_id=0)
    assert p_len == 2
    assert input_ids.tolist() == [[5, 6, 20, 21, 22], [5, 6, 23, 24, 0], [0, 7, 25, 0, 0], [0, 7, 26, 27, 28]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert pos.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 3], [0, 0, 1, 1, 1], [0, 0, 1, 2, 3]]
    input_ids, attn, _, p_len = build_inputs([[5, 6], [7]], ids, mask, group_size=2, pad_token_id=0, prompt_len=4)
    assert p_len == 4 and input_ids[2].tolist() == [0, 0, 0, 7, 25, 0, 0] and attn[2].tolist() == [0, 0, 0, 1, 1, 0, 0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_minibatch_inputs_reach_the_gpu_without_a_host_wait():
    dev = torch.device("cuda")
    ids = torch.randint(3, 50, (4, 5))
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    records = RoutingRecords.from_indices([torch.randint(0, 8, (4, 9, 2), device=dev)], 8,
                                          mask=torch.ones(4, 9, dtype=torch.bool, device=dev))
    rows = torch.tensor([2, 0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = to_device(ids, dev)
        inputs = build_inputs([[5, 6], [7], [8, 9, 10], [11]], moved, to_device(mask, dev), group_size=1,
                              pad_token_id=0)
        picked = records.select(rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(moved.cpu(), ids)
    cpu = build_inputs([[5, 6], [7], [8, 9, 10], [11]], ids, mask, group_size=1, pad_token_id=0)
    for a, b in zip(inputs[:3], cpu[:3]):
        assert torch.equal(a.cpu(), b)
    assert torch.equal(picked.indices[0].cpu(), records.indices[0].cpu()[rows])
