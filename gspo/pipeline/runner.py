"""`gspo pipeline`: run stage configs in order, each starting from an earlier stage's output.

The file format is in `gspo.pipeline.pipeline_file`, the wiring of inputs in `gspo.pipeline.wiring`. Every
stage is recorded in `<output_dir>/manifest.json`; what a re-run skips, resumes, restarts or refuses
(`--rerun`) is `plan_stage`'s answer (docs/pipeline.md, "Manifest, resume, changed configs").
"""

from __future__ import annotations

import os
import time
from typing import Any

from gspo.launch import launch_processes
from gspo.pipeline.manifest import (
    changed_keys,
    config_hash,
    git_commit,
    now_utc,
    read_manifest,
    versions,
    write_manifest,
)
from gspo.pipeline.pipeline_file import Pipeline, load_pipeline
from gspo.pipeline.run_record import (
    OutputDirError,
    claim_output_dir,
    dir_entries,
    note_written,
    read_record,
    writable_problem,
)
from gspo.pipeline.wiring import ResolvedStage, describe, resolve_stages
from gspo.registry import STAGES


class PipelineError(RuntimeError):
    """A stage cannot run as asked (changed config of a finished stage, missing runner, failed stage)."""


def _done(entry: dict[str, Any]) -> bool:
    return entry.get("status") == "done" and bool(entry.get("output")) and os.path.exists(entry["output"])


def _log(msg: str) -> None:
    print(f"[pipeline] {msg}", flush=True)


def run_eval_for(stage: ResolvedStage, output: str) -> dict[str, Any]:
    """`gspo eval` of a stage's output (its resolved eval config); writes `<stage dir>/eval.json`. Returns its
    numbers (the per-prompt lists left out)."""
    from gspo.training.evaluation import run_eval  # lazily: evaluation imports the rollout engines

    assert stage.eval_config is not None
    # model_path: the actual output (the expected path was wired before the stage ran).
    result = run_eval(stage.eval_config, model_path=output)
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


class _Processes:
    """Under `accelerate launch` / torchrun one pipeline process runs per GPU (or several on a CPU): every
    process runs each stage and each evaluation (all are distributed jobs), only the main one writes the
    manifest, clears stage directories and writes the report, and all of them meet at a barrier around each of
    those writes."""

    def __init__(self) -> None:
        self.state = None
        if launch_processes()[0] > 1:
            import torch
            from accelerate import PartialState

            # Without `cpu=True` accelerate counts one process on a machine without CUDA (gspo/launch.py): every
            # process would be the main one.
            self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def plan_stage(entry: dict[str, Any], stage: ResolvedStage, *, upstream_ran: bool, rerun: bool) -> str:
    """What to do with one stage given its manifest entry: "skip", "eval" (trained, evaluation pending),
    "resume" (rl, from checkpoints/latest) or "fresh". Raises PipelineError for a finished stage whose config changed, unless `rerun`."""
    h = config_hash(stage.config)
    trained = entry.get("status") in ("trained", "eval_failed") and bool(entry.get("output")) \
        and os.path.exists(entry["output"])
    if trained and not upstream_ran and entry.get("config_hash") == h:
        return "eval"  # trained, but its evaluation did not finish: never retrain for that
    if _done(entry) and not upstream_ran:
        if entry.get("config_hash") == h:
            return "skip"
        if not rerun:
            diff = changed_keys(entry.get("config", {}), stage.config.to_dict())
            raise PipelineError(
                f"stage {stage.spec.name!r} finished with a different config (changed: "
                f"{', '.join(diff) or '?'}); pass --rerun to run it and every later stage again, or choose "
                "another output_dir")
        return "fresh"
    interrupted = entry.get("status") in ("running", "failed") and entry.get("config_hash") == h
    latest = os.path.join(stage.config.output_dir, "checkpoints", "latest")
    if interrupted and not upstream_ran and stage.type == "rl" and os.path.isfile(latest):
        return "resume"
    return "fresh"


def run_pipeline(pipe: Pipeline, *, rerun: bool = False, report: bool = True) -> dict[str, Any]:
    """Run every stage that is not done; returns the manifest. Raises PipelineError / ConfigError."""
    from gspo.pipeline.report import write_report
    from gspo.plugins import load_builtins

    load_builtins()
    procs = _Processes()
    manifest = read_manifest(pipe.output_dir)
    previous = {s["name"]: s for s in manifest.get("stages", [])}
    outputs = {n: e["output"] for n, e in previous.items() if _done(e)}
    resolved = resolve_stages(pipe, outputs)  # everything is checked before anything runs
    missing = sorted({st.type for st in resolved if STAGES.get(st.type).runner is None})
    if missing:
        raise PipelineError(f"no runner registered for stage type(s) {', '.join(missing)} (stages with a "
                            f"runner: {', '.join(n for n, s in STAGES.items() if s.runner)})")
    if procs.main:
        check_pipeline_dirs(pipe, [st.config.output_dir for st in resolved])
        _log(describe(pipe, resolved))
    manifest = {"name": pipe.name, "pipeline_file": os.path.abspath(pipe.source_path or ""),
                "output_dir": os.path.abspath(pipe.output_dir),
                "created_at": manifest.get("created_at", now_utc()),
                "stages": [previous.get(st.spec.name) or {"name": st.spec.name, "type": st.type,
                                                          "status": "pending"} for st in resolved]}
    env = {"versions": versions(), "git_commit": git_commit()}
    upstream_ran = False
    for i in range(len(resolved)):
        # Re-resolve: an earlier stage of this run may have written its output somewhere else than expected.
        st = resolve_stages(pipe, outputs)[i]
        entry = manifest["stages"][i]
        action = plan_stage(entry, st, upstream_ran=upstream_ran, rerun=rerun)
        if action == "skip":
            if procs.main:
                _log(f"stage {st.spec.name}: done ({entry['output']}), skipped")
            continue
        if action != "eval":
            _run_stage(pipe, st, entry, manifest, resume=action == "resume", env=env, procs=procs)
        _evaluate_and_finish(pipe, st, entry, manifest, procs=procs)
        outputs[st.spec.name] = entry["output"]
        upstream_ran = True
    if report and procs.main:
        print(write_report(pipe.output_dir), flush=True)
        _log(f"report: {os.path.join(pipe.output_dir, 'report.md')}")
    procs.barrier()
    return manifest


def _run_stage(pipe: Pipeline, st: ResolvedStage, entry: dict[str, Any], manifest: dict[str, Any], *,
               resume: bool, env: dict[str, Any], procs: _Processes) -> None:

    cfg = st.config
    if resume:
        cfg.resume_from = "latest"
    if procs.main:
        if resume:
            _log(f"stage {st.spec.name}: interrupted; resuming from {cfg.output_dir}/checkpoints/latest")
        elif dir_entries(cfg.output_dir):
            _log(f"stage {st.spec.name}: {entry.get('status', 'stale')} before; starting it again from "
                 "scratch (deleting only what it wrote)")
        owner = os.path.abspath(pipe.output_dir)
        record = read_record(cfg.output_dir)
        ours = record is not None and record.get("owner") == owner
        claim_output_dir(cfg.output_dir, stage=st.type, resume=resume, overwrite=ours or pipe.overwrite,
                         owner=owner)
        # Every later stage depends on this one: none of them counts as done any more (also if this run is
        # killed before reaching them).
        for e in manifest["stages"][manifest["stages"].index(entry) + 1:]:
            e["status"] = "pending"
        entry.clear()
        entry.update({"name": st.spec.name, "type": st.type, "status": "running", "config": cfg.to_dict(),
                      "config_hash": config_hash(cfg), "config_file": st.spec.config,
                      "overrides": st.spec.overrides,
                      "wiring": st.wiring, "output": None, "resumed_from": cfg.resume_from,
                      "started_at": now_utc(), "ended_at": None, "wall_s": None, **env, "metrics": {}})
        write_manifest(pipe.output_dir, manifest)
        _log(f"stage {st.spec.name} [{st.type}] -> {cfg.output_dir}")
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(cfg.to_yaml())  # `gspo train <stage dir>/config.yaml` repeats this stage alone
    procs.barrier()
    start = time.time()
    try:
        output = STAGES.get(st.type).runner(cfg)
    except BaseException as e:
        if procs.main:
            note_written(cfg.output_dir)
        _record_failure(pipe, entry, manifest, e, start, procs)
        raise
    procs.barrier()
    # On every process: the evaluation (every process runs it) and the later stages' wiring read the output.
    entry.update({"status": "trained", "output": os.path.abspath(output) if output else None,
                  "wall_s": round(time.time() - start, 3)})
    if procs.main:
        note_written(cfg.output_dir)
        # Recorded before the evaluation: a failed evaluation never costs the trained stage.
        write_manifest(pipe.output_dir, manifest)


def check_pipeline_dirs(pipe: Pipeline, stage_dirs: list[str]) -> None:
    """Refuse (OutputDirError, nothing written) a pipeline folder or stage folder holding files this pipeline
    did not write, unless pipe.overwrite; the folders of stages this pipeline ran before are its own."""
    root, owner = pipe.output_dir, os.path.abspath(pipe.output_dir)
    problem = writable_problem(root)
    if problem:
        raise OutputDirError(problem)
    if not os.path.isfile(os.path.join(root, "manifest.json")) and dir_entries(root) and not pipe.overwrite:
        raise OutputDirError(
            f"output_dir {root!r} is not empty and gspo did not write it (no manifest.json; "
            f"{', '.join(dir_entries(root)[:5])}); "
            "choose a new output_dir, or pass overwrite=true to run the pipeline in it anyway (files gspo did "
            "not write are kept)")
    for d in stage_dirs:
        record = read_record(d)
        if dir_entries(d) and not pipe.overwrite and (record is None or record.get("owner") != owner):
            what = "another run's" if record is not None else "not written by gspo"
            raise OutputDirError(
                f"stage folder {d!r} holds files this pipeline did not write ({what}: "
                f"{', '.join(dir_entries(d)[:5])}); choose a new output_dir, or pass overwrite=true (files gspo "
                "did not write are kept)")


def _record_failure(pipe: Pipeline, entry: dict[str, Any], manifest: dict[str, Any], e: BaseException,
                    start: float, procs: _Processes, status: str = "failed") -> None:
    if procs.main:
        entry.update({"status": status, "error": f"{type(e).__name__}: {e}", "ended_at": now_utc(),
                      "wall_s": round(time.time() - start, 3)})
        write_manifest(pipe.output_dir, manifest)


def _evaluate_and_finish(pipe: Pipeline, st: ResolvedStage, entry: dict[str, Any], manifest: dict[str, Any],
                         *, procs: _Processes) -> None:
    """The stage's evaluation (every process samples its share, the main one writes eval.json), then status
    done."""
    from gspo.pipeline.report import stage_summary

    output = entry.get("output")
    start = time.time()
    if st.eval_config is not None and output:
        if procs.main:
            _log(f"stage {st.spec.name}: eval of {output}")
        entry["eval_wiring"] = st.eval_wiring
        try:
            entry["eval"] = run_eval_for(st, output)
        except BaseException as e:
            _record_failure(pipe, entry, manifest, e, start, procs, status="eval_failed")
            raise
    procs.barrier()
    if procs.main:
        entry.update({"status": "done", "ended_at": now_utc(), "error": None,
                      "metrics": stage_summary(st.config.output_dir, st.type)})
        write_manifest(pipe.output_dir, manifest)
        _log(f"stage {st.spec.name}: done in {entry['wall_s']:.1f} s -> {output}")


def validate_pipeline(path: str, overrides: list[str] | tuple[str, ...] = ()
                      ) -> tuple[Pipeline, list[ResolvedStage]]:
    """Load and check a pipeline file and every stage config with its wiring (nothing runs, nothing loads)."""
    from gspo.plugins import load_builtins

    load_builtins()
    pipe = load_pipeline(path, overrides)
    done = {e["name"]: e["output"] for e in read_manifest(pipe.output_dir).get("stages", []) if _done(e)}
    stages = resolve_stages(pipe, done)
    check_pipeline_dirs(pipe, [st.config.output_dir for st in stages])  # what `gspo pipeline` would refuse
    return pipe, stages
