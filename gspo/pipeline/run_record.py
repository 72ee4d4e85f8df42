"""The run record, `OUTPUT_DIR/gspo_run.json`: which run owns an output folder and what it wrote there.

gspo deletes, prunes or overwrites only what it wrote. Before a stage writes anything, `claim_output_dir`
decides what may happen to the folder:

  - missing or empty: a new run claims it (a fresh record);
  - holds a record of an earlier run: continuing it (`resume_from`) keeps the record; `overwrite=true`
    deletes exactly what that run wrote (the entries its record lists, plus gspo's own file names) and keeps
    everything else; otherwise the run is refused with the choices named;
  - holds files and no record (someone else's folder): refused, unless `overwrite=true`, which keeps every
    one of those files (they are listed in the new record as `foreign`, so no later overwrite touches them).

The record:
    {"run_id": "...", "stage": "rl", "created_at": "...", "updated_at": "...",
     "foreign": [entries present before gspo claimed the folder], "written": [entries gspo wrote]}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from typing import Any

from gspo.pipeline.manifest import now_utc

logger = logging.getLogger("gspo")

RECORD = "gspo_run.json"
# Top-level names gspo's stages write into an output_dir. A run killed before its record listed what it wrote
# still owns these (an overwrite deletes them unless they were there before gspo claimed the folder).
KNOWN_OUTPUTS = ("config.yaml", "metrics.jsonl", "samples.jsonl", "checkpoints", "final", "final_adapter",
                 "eval.json", "data.jsonl", "stats.json", "trl", "metrics.jsonl.tmp", "samples.jsonl.tmp")


class OutputDirError(ValueError):
    """The output folder cannot be used as asked (another run's, someone else's files, not writable)."""


def read_record(output_dir: str) -> dict[str, Any] | None:
    path = os.path.join(output_dir, RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise OutputDirError(f"{path}: cannot read the run record ({e}); move the folder aside or choose "
                             "another output_dir") from None
    return record if isinstance(record, dict) else None


def write_record(output_dir: str, record: dict[str, Any]) -> None:
    """Atomically (temp file + rename): a kill mid-write never leaves a torn record."""
    path = os.path.join(output_dir, RECORD)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def dir_entries(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return sorted(e for e in os.listdir(output_dir) if e not in (RECORD, RECORD + ".tmp"))


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def owned_entries(output_dir: str, record: dict[str, Any]) -> list[str]:
    """Entries of output_dir that the recorded run wrote (what an overwrite may delete)."""
    foreign = set(record.get("foreign", []))
    written = set(record.get("written", [])) | set(KNOWN_OUTPUTS)
    return [e for e in dir_entries(output_dir) if e in written and e not in foreign]


def writable_problem(output_dir: str) -> str | None:
    """Why output_dir cannot be written (it is a file, a parent is read-only, ...), or None."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"output_dir {output_dir!r} is a file, not a folder"
    probe = path
    while not os.path.exists(probe):  # the nearest existing ancestor must let us create the rest
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"output_dir {output_dir!r}: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"output_dir {output_dir!r}: {probe} is not writable (permission denied)"
    return None


def check_output_dir(output_dir: str, *, resume: bool, overwrite: bool) -> str | None:
    """The problem `claim_output_dir` would raise, as one line, or None (nothing is written)."""
    problem = writable_problem(output_dir)
    if problem:
        return problem
    entries = dir_entries(output_dir)
    if not entries:
        return None
    record = read_record(output_dir)
    choices = ("continue it with resume_from=latest, choose a new output_dir, or pass overwrite=true "
               "(deletes only what that run wrote)")
    if record is not None:
        if resume or overwrite:
            return None
        what = f"stage {record.get('stage', '?')}, started {record.get('created_at', '?')}"
        return f"output_dir {output_dir!r} holds an earlier run ({what}: {_shown(entries)}); {choices}"
    if resume and os.path.isfile(os.path.join(output_dir, "checkpoints", "latest")):
        return None  # a run written before run records existed: resuming it is what the user asks
    if overwrite:
        return None
    return (f"output_dir {output_dir!r} is not empty and gspo did not write it ({_shown(entries)}); choose a "
            "new output_dir, or pass overwrite=true to write into it anyway (those files are kept)")


def claim_output_dir(output_dir: str, *, stage: str, resume: bool, overwrite: bool,
                     owner: str | None = None) -> dict[str, Any]:
    """Make output_dir this run's (see the module docstring); returns the record written. Raises
    OutputDirError with one line naming the folder and the choices."""
    problem = check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    if problem:
        raise OutputDirError(problem)
    record = read_record(output_dir)
    entries = dir_entries(output_dir)
    if record is not None and resume:
        record["updated_at"] = now_utc()
        write_record(output_dir, record)
        return record
    foreign = [] if record is None and resume else list(entries)
    if record is not None:  # overwrite=true on an earlier run: delete only what it wrote
        owned = owned_entries(output_dir, record)
        for name in owned:
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        if owned:
            logger.warning("overwrite=true: deleted what the earlier run wrote in %s: %s", output_dir,
                           _shown(owned, 20))
        foreign = [e for e in entries if e not in owned]
    if foreign:
        logger.warning("%s: keeping %d entries gspo did not write: %s", output_dir, len(foreign),
                       _shown(foreign))
    os.makedirs(output_dir, exist_ok=True)
    record = {"run_id": uuid.uuid4().hex, "stage": stage, "owner": owner, "created_at": now_utc(),
              "updated_at": now_utc(), "foreign": foreign, "written": []}
    write_record(output_dir, record)
    return record


def note_written(output_dir: str) -> None:
    """List what is now in output_dir (less the foreign entries) as written by the recorded run."""
    record = read_record(output_dir)
    if record is None:
        return
    foreign = set(record.get("foreign", []))
    record["written"] = [e for e in dir_entries(output_dir) if e not in foreign]
    record["updated_at"] = now_utc()
    write_record(output_dir, record)
