"""The optimizer the rl stage builds: fused AdamW where the parameters step on a GPU, torch's default elsewhere."""

from types import SimpleNamespace

import pytest
import torch

from gspo.training.optim import build_optimizer

pytestmark = pytest.mark.timeout(60)

OPTIM = SimpleNamespace(lr=1e-3, adam_beta1=0.9, adam_beta2=0.99, adam_eps=1e-8, weight_decay=0.0,
                        scheduler="constant", warmup_steps=0)


@pytest.mark.parametrize(("device", "fused"), [(None, None), ("cpu", None), ("cuda", True)])
def test_fused_only_when_the_parameters_step_on_a_gpu(device, fused):
    model = torch.nn.Linear(4, 2)
    model.bias.requires_grad_(False)
    opt, sched = build_optimizer(model, OPTIM, 10, torch.device(device) if device else None)
    assert opt.defaults["fused"] is fused
    assert [p for g in opt.param_groups for p in g["params"]] == [model.weight]  # trainable parameters only
    assert sched.get_last_lr() == [1e-3]
