"""I/O failures name the path and the cause; a torn last line of metrics.jsonl / samples.jsonl is repaired on
resume with a warning; `gspo` prints one line for them (the traceback only with --debug)."""

from __future__ import annotations

import errno
import json
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from gspo.training import checkpoint
from gspo.training.checkpoint import resolve_checkpoint, save_checkpoint
from gspo.training.metrics_log import MetricsWriter, read_metrics

pytestmark = pytest.mark.timeout(120)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 2)

    def save_pretrained(self, d):
        os.makedirs(d, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(d, "weights.pt"))


class _Tok:
    def save_pretrained(self, d):
        Path(d, "tokenizer.json").write_text("{}")


def _save(out, k):
    model = _Model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(str(out), k, model=model, tokenizer=_Tok(), optimizer=opt, scheduler=sched,
                           trainer_state={"rollout": k, "step": k, "sampler": {}})


def test_disk_full_in_torch_save_names_the_cause_and_the_checkpoint(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)

    def full(*a, **k):  # what torch's writer raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240")

    monkeypatch.setattr(torch, "save", full)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 4096))
    with pytest.raises(OSError) as e:
        _save(tmp_path, 2)
    assert e.value.errno == errno.ENOSPC and "No space left on device" in e.value.strerror
    assert e.value.filename.endswith("rollout-000002")
    assert resolve_checkpoint(str(tmp_path), "latest") == good  # data intact
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path / "checkpoints"))


def test_disk_full_on_a_tiny_filesystem_names_the_metrics_file(tmp_path):
    """A real full disk where one can be made (a 64 KiB tmpfs needs root); else a full /dev/full write."""
    target = tmp_path / "small"
    target.mkdir()
    mounted = os.geteuid() == 0 and os.system(f"mount -t tmpfs -o size=64k tmpfs {target} 2>/dev/null") == 0
    try:
        if mounted:
            writer = MetricsWriter(str(target))
            with pytest.raises(OSError) as e:
                for i in range(10_000):
                    writer.write({"step": i, "rollout": i, "pad": "x" * 200})
            path = writer.path
        else:
            writer = MetricsWriter(str(tmp_path / "w"))
            os.remove(writer.path) if os.path.exists(writer.path) else None
            os.symlink("/dev/full", writer.path)
            with pytest.raises(OSError) as e:
                writer.write({"step": 1, "rollout": 1})
            path = writer.path
        assert e.value.errno == errno.ENOSPC and e.value.filename == path
    finally:
        if mounted:
            os.system(f"umount {target}")


def test_resume_repairs_a_torn_last_line(tmp_path, caplog):
    out = tmp_path
    rows = [{"step": i, "rollout": i} for i in (1, 2, 3)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rol')
    (out / "samples.jsonl").write_text(json.dumps({"rollout": 1, "completion": "a"}) + "\n" + '{"rollout": 2, "c')
    with caplog.at_level("WARNING", logger="gspo"):
        MetricsWriter(str(out), keep_until_rollout=2)
    assert read_metrics(str(out / "metrics.jsonl")) == rows[:2]
    assert read_metrics(str(out / "samples.jsonl")) == [{"rollout": 1, "completion": "a"}]
    assert any("torn last line" in r.getMessage() and "metrics.jsonl:4" in r.getMessage() for r in caplog.records)


def test_a_bad_line_inside_the_file_is_named_not_repaired(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        MetricsWriter(str(tmp_path), keep_until_rollout=3)


def test_cli_prints_one_line_for_an_io_error_and_the_traceback_with_debug(tmp_path, monkeypatch, capsys):
    from gspo import cli

    def boom(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl")

    monkeypatch.setattr(cli, "_train", boom)
    assert cli.main(["train", "cfg.yaml"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: No space left on device: runs/x/metrics.jsonl") and err.count("\n") == 1
    with pytest.raises(OSError):
        cli.main(["train", "cfg.yaml", "--debug"])
