"""gspo deletes, prunes or overwrites only what it wrote: the run record (`gspo_run.json`), the refusal of a
used or foreign output_dir with the choices named, `overwrite=true`, pruning that keeps what `latest` names.

The runs are real (tiny MoE from the warm-start fixture, GSPO with HF-generate rollouts)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from gspo.cli import main
from gspo.pipeline.run_record import RECORD, check_output_dir, claim_output_dir, note_written

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "tiny")
RL = os.path.join(TINY, "reasoning_rl.yaml")
FAST = ["rollout.engine=hf_generate", "rollout.prompts_per_step=4", "logging.progress=false"]

pytestmark = pytest.mark.timeout(600)


def _train(warm_model, out, *extra):
    return main(["train", RL, f"model.name_or_path={warm_model}", f"output_dir={out}", *FAST, *extra])


def _checkpoints(out):
    return sorted(e for e in os.listdir(os.path.join(out, "checkpoints")) if e.startswith("rollout-"))


def _latest(out):
    with open(os.path.join(out, "checkpoints", "latest")) as f:
        return f.read().strip()


def test_fresh_run_into_a_used_output_dir_is_refused_then_overwrite_replaces_only_that_run(
        warm_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(warm_model, out, "train.num_rollouts=3", "train.save_every=3") == 0
    metrics_before = (out / "metrics.jsonl").read_text()
    assert json.loads((out / RECORD).read_text())["stage"] == "rl"
    (out / "notes.txt").write_text("mine")  # the user's own file, added after the run
    capsys.readouterr()

    # The case: a second fresh run into the same folder. Refused before anything is written.
    assert _train(warm_model, out, "train.num_rollouts=2", "train.save_every=2") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "holds an earlier run" in err and "resume_from=latest" in err and "overwrite=true" in err
    assert (out / "metrics.jsonl").read_text() == metrics_before
    assert _checkpoints(out) == ["rollout-000003"]

    # overwrite=true: the earlier run's outputs go, the user's file stays, the new run is consistent.
    assert _train(warm_model, out, "train.num_rollouts=2", "train.save_every=2", "overwrite=true") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert _checkpoints(out) == ["rollout-000002"] and _latest(out) == "rollout-000002"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["rollout"] for r in rows) == 2
    # ... and it resumes (the run then failed with "Repo id must be in the form ...").
    assert _train(warm_model, out, "train.num_rollouts=3", "train.save_every=2", "resume_from=latest") == 0
    assert _latest(out) == "rollout-000003"
    assert "notes.txt" in json.loads((out / RECORD).read_text())["foreign"]


def test_foreign_output_dir_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    cfg = os.path.join(TINY, "cold_start.yaml")
    assert main(["train", cfg, f"output_dir={out}", "logging.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "gspo did not write it" in err and "precious.txt" in err and "overwrite=true" in err
    assert (out / "precious.txt").read_text() == "keep" and sorted(os.listdir(out)) == ["precious.txt"]


def test_overwrite_deletes_only_what_the_record_lists(tmp_path):
    out = str(tmp_path / "o")
    os.makedirs(out)
    Path(out, "before.txt").write_text("x")
    claim_output_dir(out, stage="rl", resume=False, overwrite=True)
    os.makedirs(os.path.join(out, "checkpoints"))
    Path(out, "metrics.jsonl").write_text("{}\n")
    note_written(out)
    Path(out, "later.txt").write_text("y")  # the user's, after gspo listed its outputs
    assert "earlier run" in check_output_dir(out, resume=False, overwrite=False)
    claim_output_dir(out, stage="rl", resume=False, overwrite=True)
    assert sorted(os.listdir(out)) == sorted(["before.txt", "later.txt", RECORD])


def test_output_dir_that_is_a_file_or_read_only_is_named(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert "is a file" in check_output_dir(str(f), resume=False, overwrite=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        problem = check_output_dir(str(ro / "out"), resume=False, overwrite=False)
        if os.geteuid() != 0:  # root writes anywhere: the check asks the kernel (os.access), as a write would
            assert "not writable" in problem
    finally:
        ro.chmod(0o700)


def _pipeline_file(tmp_path, out):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(out), "stages": [
        {"name": "reward_model", "config": os.path.join(TINY, "reward_model.yaml"),
         "overrides": ["reward_model.max_steps=2", "data.num_samples=64", "logging.progress=false"]}]}))
    return str(path)


def test_pipeline_never_deletes_a_stage_folder_it_did_not_create(tmp_path, capsys):
    """The issue's case: `mkdir -p D/reward_model && echo keep > D/reward_model/precious.txt`."""
    out = tmp_path / "D"
    (out / "reward_model").mkdir(parents=True)
    (out / "reward_model" / "precious.txt").write_text("keep")
    pipe = _pipeline_file(tmp_path, out)
    assert main(["validate", pipe]) == 2  # validation says what the run would refuse
    assert main(["pipeline", pipe, "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "overwrite=true" in err and "did not write" in err
    assert (out / "reward_model" / "precious.txt").read_text() == "keep"
    assert not (out / "manifest.json").exists()
    # With overwrite=true the stage runs into the folder and keeps the file.
    assert main(["pipeline", pipe, "--no-report", "overwrite=true"]) == 0
    assert (out / "reward_model" / "precious.txt").read_text() == "keep"
    assert (out / "reward_model" / "final").is_dir()


def test_pipeline_rerun_of_a_stage_clears_only_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "D"
    pipe = _pipeline_file(tmp_path, out)
    assert main(["pipeline", pipe, "--no-report"]) == 0
    (out / "reward_model" / "mine.txt").write_text("keep")  # added by the user after the stage
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"][0]["status"] = "failed"  # as after a crash: the stage starts again from scratch
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["pipeline", pipe]) == 0
    assert f"[pipeline] report: {out / 'report.md'}" in capsys.readouterr().out  # the run's end names it
    assert (out / "reward_model" / "mine.txt").read_text() == "keep"
    assert (out / "reward_model" / "final").is_dir()
