"""Checks that need files opened but no model loaded: what `gspo validate` adds to the config checks, and what
`gspo train` runs before it loads anything.

    paths      model.name_or_path, reward `model_path` kwargs: a local folder exists (with config.json), or
               the name is a Hugging Face Hub id (said so in a note; it is downloaded when the model loads)
    data       a local data file parses (the first bad line named with its number), has rows, every row has
               the prompt column; a synthetic task builds its rows
    rewards    each reward's signature can take the data's columns (the trainer's start-up check, run early)
    output_dir writable, and safe to write: not another run's or someone else's files (gspo/pipeline/run_record.py)
    resume_from a finished checkpoint exists (`latest` in output_dir, or the named folder)
    processes  the launch (torchrun, accelerate launch, mpirun) has no more processes than the stage runs on;
               an rl launch of N processes has prompts_per_step divisible by N

`preflight` returns (problems, notes): problems are ConfigErrors (one line each, naming the key), notes are
facts worth printing (a Hub id). Nothing here downloads or loads a model.
"""

from __future__ import annotations

import os
import re
from typing import Any

from gspo.config import Config, ConfigError
from gspo.launch import launch_processes, launch_rank, process_count_problem
from gspo.registry import STAGES

# A Hugging Face Hub repo id: `name` or `org/name` (letters, digits, - _ .). A local path that does not exist
# but looks like this may be a Hub id, and transformers will treat it as one.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _model_path_problem(key: str, value: str, notes: list[str]) -> ConfigError | None:
    if value.startswith("tiny:"):
        return None
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
            return ConfigError(f"{key}: {value!r} is a folder without config.json (not a saved model)", key)
        return None
    if os.path.exists(path):
        return ConfigError(f"{key}: {value!r} is a file; expected a model folder or a Hub id", key)
    if HUB_ID.match(value) and not value.startswith((".", "~")):
        notes.append(f"{key}: {value!r} is not a local folder; treated as a Hugging Face Hub id "
                     "(downloaded when the model loads)")
        return None
    return ConfigError(f"{key}: model folder {value!r} does not exist (cwd: {os.getcwd()}); train the stage "
                       "that writes it first, or give an existing folder / a Hub id `org/name`", key)


def _data_rows(cfg: Config) -> list[dict[str, Any]] | None:
    """The rows a stage would read, when they can be read without a download (None: not checked here)."""
    d = cfg.data
    if d.path is not None and not os.path.exists(os.path.expanduser(d.path)):
        return None  # a Hub dataset id (a missing local file is check_config's error)
    spec = STAGES.get(cfg.stage)  # check_config checked the name
    if spec.data_rows is not None:
        return spec.data_rows(cfg)
    from gspo.data import build_dataset

    return build_dataset(d, seed=cfg.seed).rows


def _resume_problem(cfg: Config) -> ConfigError | None:
    if cfg.resume_from is None:
        return None
    if cfg.resume_from == "latest":
        pointer = os.path.join(cfg.output_dir, "checkpoints", "latest")
        if not os.path.isfile(pointer):
            return ConfigError(f"resume_from: `latest` but {cfg.output_dir!r} has no finished checkpoint "
                               f"({pointer} does not exist); drop resume_from to start fresh", "resume_from")
        with open(pointer, encoding="utf-8") as f:
            target = os.path.join(cfg.output_dir, "checkpoints", f.read().strip())
    else:
        target = cfg.resume_from
    if not os.path.isfile(os.path.join(target, "trainer_state.json")):
        return ConfigError(f"resume_from: {target!r} is not a finished checkpoint (no trainer_state.json)",
                           "resume_from")
    return None


def _server_problem(url: str) -> str | None:
    """Why the rollout server at `url` cannot be used (nothing answers /health within 10 s), or None."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10) as resp:
            json.loads(resp.read())["server_id"]
    except (OSError, ValueError, KeyError) as e:
        return (f"no rollout server answers at {url} ({getattr(e, 'reason', e)}); start one with "
                "`gspo serve CONFIG`, or set rollout.server_launch: true and leave server_url unset")
    return None


def preflight(cfg: Config, *, output_dir: bool = True, skip: tuple[str, ...] = (), evaluation: bool = False
              ) -> tuple[list[ConfigError], list[str]]:
    """Problems and notes (see the module docstring). `output_dir=False` leaves the folder checks to a caller
    that manages the folder (the pipeline); `skip`: keys whose inputs an earlier pipeline stage writes;
    `evaluation`: the config of an evaluation, whose `stage` does not run (the launch-size checks of the stage
    are left out: an evaluation splits its prompts over any number of processes)."""
    from gspo.pipeline.run_record import check_output_dir
    from gspo.rewards import RewardLoadError, RewardSet

    problems: list[ConfigError] = []
    notes: list[str] = []
    too_many = None if evaluation else process_count_problem(cfg.stage, STAGES.get(cfg.stage).max_processes)
    if too_many:
        problems.append(ConfigError(f"stage: {too_many}", "stage"))
    world, var = launch_processes()
    if world > 1 and cfg.stage == "rl" and not evaluation and cfg.rollout.prompts_per_step % world:
        # Each process samples whole prompts (a group is never split across processes): B/N each.
        problems.append(ConfigError(
            f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} prompts cannot be split evenly over the "
            f"{world} processes of this launch ({var}={world}); use a multiple of {world}",
            "rollout.prompts_per_step"))
    paths = [("model.name_or_path", cfg.model.name_or_path)]
    paths += [(f"rewards.{i}.kwargs.model_path", r.kwargs["model_path"]) for i, r in enumerate(cfg.rewards)
              if isinstance(r.kwargs.get("model_path"), str)]
    for key, value in paths:
        if key not in skip:
            p = _model_path_problem(key, value, notes)
            if p:
                problems.append(p)
    rows = None
    if "data.path" not in skip:
        key = "data.path" if cfg.data.path is not None else "data.task"
        try:
            rows = _data_rows(cfg)
        except (ValueError, TypeError, KeyError, OSError) as e:
            problems.append(ConfigError(f"{key}: {e}", key))
    if rows is not None and STAGES.get(cfg.stage).needs_rewards and cfg.rewards:
        columns = sorted({c for r in rows for c in r} - {"prompt"})
        base_dir = os.path.dirname(os.path.abspath(cfg.source_path)) if cfg.source_path else None
        specs = [r for i, r in enumerate(cfg.rewards) if f"rewards.{i}.kwargs.model_path" not in skip]
        try:
            RewardSet.from_specs(specs, columns=columns, base_dir=base_dir)
        except RewardLoadError as e:
            problems.append(ConfigError(f"rewards: {e}", "rewards"))
    ro = cfg.rollout
    if cfg.stage == "rl" and ro.engine == "vllm_server" and ro.server_url and "rollout.server_url" not in skip:
        p = _server_problem(ro.server_url)
        if p:
            problems.append(ConfigError(f"rollout.server_url: {p}", "rollout.server_url"))
    if output_dir and launch_rank() == 0:  # rank 0 claims the folder; the others would race it
        problem = check_output_dir(cfg.output_dir, resume=cfg.resume_from is not None, overwrite=cfg.overwrite)
        if problem:
            problems.append(ConfigError(f"output_dir: {problem}", "output_dir"))
        p = _resume_problem(cfg)
        if p:
            problems.append(p)
    return problems, notes
