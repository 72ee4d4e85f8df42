"""Checkpoints are atomic: a crash or SIGKILL mid-save never leaves a broken `latest`."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from gspo.training.checkpoint import load_training_state, resolve_checkpoint, save_checkpoint

HELPERS = textwrap.dedent(
    """
    import os, time, torch
    class Model(torch.nn.Module):
        def __init__(self, slow=0.0, fail=False):
            super().__init__(); self.w = torch.nn.Linear(3, 3); self.slow = slow; self.fail = fail
        def forward(self, x):
            return self.w(x)
        def save_pretrained(self, d):
            os.makedirs(d, exist_ok=True)
            torch.save(self.state_dict(), os.path.join(d, "weights.pt"))
            time.sleep(self.slow)
            if self.fail:
                raise RuntimeError("disk full")
            open(os.path.join(d, "config.json"), "w").write("{}")
    class Tok:
        def forward(self, x):
            return self.w(x)
        def save_pretrained(self, d):
            open(os.path.join(d, "tokenizer.json"), "w").write("{}")
    def opt_sched(model):
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    """
)
exec(HELPERS)  # noqa: S102 (the same helper source also runs in the subprocess that gets killed)


def _save(out, k, model, keep=2):
    opt, sched = opt_sched(model)  # noqa: F821 (defined by exec above)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    return save_checkpoint(out, k, model=model, tokenizer=Tok(), optimizer=opt, scheduler=sched,  # noqa: F821
                           trainer_state={"rollout": k, "step": 4 * k, "sampler": {"epoch": 0, "position": k}},
                           keep=keep)


def _complete(path):
    names = set(os.listdir(path)) | {f"model/{n}" for n in os.listdir(os.path.join(path, "model"))}
    return {"optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "model/config.json",
            "model/weights.pt", "model/tokenizer.json"} <= names


def test_roundtrip_restores_optimizer_rng_and_state(tmp_path):
    model = Model()  # noqa: F821
    path = _save(str(tmp_path), 3, model)
    assert resolve_checkpoint(str(tmp_path), "latest") == path and _complete(path)
    expected_next = torch.rand(4)  # the RNG stream right after the save
    opt, sched = opt_sched(model)  # noqa: F821
    state = load_training_state(path, opt, sched)
    assert state["rollout"] == 3 and state["sampler"]["position"] == 3
    assert torch.equal(torch.rand(4), expected_next)
    assert opt.state_dict()["state"][0]["step"] == 1  # Adam moments came back


def test_failed_save_keeps_previous_latest(tmp_path):
    good = _save(str(tmp_path), 1, Model())  # noqa: F821
    with pytest.raises(RuntimeError, match="disk full"):
        _save(str(tmp_path), 2, Model(fail=True))  # noqa: F821
    assert resolve_checkpoint(str(tmp_path), "latest") == good
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "rollout-000002"))


def test_keep_prunes_old_checkpoints(tmp_path):
    for k in range(1, 5):
        _save(str(tmp_path), k, Model(), keep=2)  # noqa: F821
    done = sorted(e for e in os.listdir(tmp_path / "checkpoints") if e.startswith("rollout-"))
    assert done == ["rollout-000003", "rollout-000004"]


def test_sigkill_mid_save_never_breaks_latest(tmp_path):
    script = HELPERS + textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.getcwd()!r})
        from gspo.training.checkpoint import save_checkpoint
        k = 0
        while True:
            k += 1
            m = Model(slow=0.05); opt, sched = opt_sched(m)
            save_checkpoint({str(tmp_path)!r}, k, model=m, tokenizer=Tok(), optimizer=opt, scheduler=sched,
                            trainer_state={{"rollout": k, "step": k, "sampler": {{}}}}, keep=3)
            print(k, flush=True)
        """
    )
    for delay in (0.3, 0.45, 0.62):  # kill at different points of different saves
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert proc.stdout.readline()  # at least one save finished
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = resolve_checkpoint(str(tmp_path), "latest")
        assert _complete(latest), latest
        opt, sched = opt_sched(Model())  # noqa: F821
        assert load_training_state(latest, opt, sched)["rollout"] >= 1


def test_prune_never_removes_what_latest_names(tmp_path):
    """A run saving rollout 2 next to an earlier run's rollouts 3 and 6 (the issue's reused output_dir):
    pruning by name used to delete the checkpoint just written, leaving `latest` pointing at nothing."""
    root = tmp_path / "checkpoints"
    for k in (3, 6):
        (root / f"rollout-{k:06d}").mkdir(parents=True)
    path = _save(str(tmp_path), 2, Model(), keep=2)  # noqa: F821
    assert resolve_checkpoint(str(tmp_path), "latest") == path and _complete(path)
    # Checkpoints newer than `latest` are not this run's to prune.
    assert sorted(os.listdir(root)) == ["latest", "rollout-000002", "rollout-000003", "rollout-000006"]
    _save(str(tmp_path), 1, Model(), keep=1)  # noqa: F821
    assert resolve_checkpoint(str(tmp_path), "latest").endswith("rollout-000001")
    assert (root / "rollout-000001").is_dir()


def test_saved_config_json_is_clean_and_provenance_sits_next_to_it(tmp_path):
    """config.json is the architecture's own (no gspo_* keys, no local paths); where the weights came from and
    the experts backend are in gspo_model.json of the same folder."""
    import json
    from types import SimpleNamespace

    from gspo.models.loading import PROVENANCE_FILE, load_policy, read_provenance

    cfg = SimpleNamespace(name_or_path="tiny:qwen3_moe", tokenizer=None, dtype="float32",
                          experts_implementation="auto", attn_implementation=None, trust_remote_code=False,
                          gradient_checkpointing=False, tiny={})
    model, tok = load_policy(cfg, output_dir=tmp_path)
    opt, sched = opt_sched(model)  # noqa: F821 (defined by exec above)
    path = save_checkpoint(str(tmp_path / "run"), 1, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                           trainer_state={"rollout": 1})
    model_dir = os.path.join(path, "model")
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert not [k for k in config if k.startswith("gspo")]
    assert str(tmp_path) not in json.dumps(config)
    assert os.path.isfile(os.path.join(model_dir, PROVENANCE_FILE))
    assert read_provenance(model_dir) == {"loaded_from": os.path.join(str(tmp_path), "tiny_model"),
                                          "experts_implementation": "grouped_mm", "experts_requested": "auto"}
