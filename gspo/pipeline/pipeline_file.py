"""The pipeline file (`gspo pipeline FILE`): its format (docs/pipeline.md, "The pipeline file"), read and
checked into a `Pipeline`: root keys `name`, `output_dir`, `overwrite`, `eval: {config, overrides}` and
`stages`, each with `name`, `config` (relative to the pipeline file), `overrides`, `input` and `eval`.
Command-line overrides: `stages.<stage>.<key>=value` for one stage; `output_dir=`, `name=`, `overwrite=`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gspo.config import ConfigError, apply_overrides, read_yaml
from gspo.registry import closest

ROOT_KEYS = ("name", "output_dir", "overwrite", "eval", "stages")
ROOT_EVAL_KEYS = ("config", "overrides")
STAGE_KEYS = ("name", "config", "overrides", "input", "eval")
INPUT_KEYS = ("model", "data", "reward_model")


# -- The pipeline file ---------------------------------------------------------------------------------------


@dataclass
class StageEntry:
    """One entry of `stages:`; `config` is an absolute path, `overrides` include the command line's."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    input: dict[str, str | None] = field(default_factory=dict)  # explicit sources only (INPUT_KEYS)
    eval: list[str] | None = None  # None = no evaluation; a list = run it, with these overrides


@dataclass
class Pipeline:
    """A loaded pipeline file: its name, output folder, stages in order and the `eval:` settings."""

    name: str
    output_dir: str
    stages: list[StageEntry]
    source_path: str | None = None
    eval_config: str | None = None  # absolute path; None = each stage's own config
    eval_overrides: list[str] = field(default_factory=list)
    overwrite: bool = False  # write into folders holding files gspo did not write (they are kept)

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.output_dir, stage)

    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def is_pipeline_file(path: str | os.PathLike) -> bool:
    """A YAML file with a top-level `stages:` key is a pipeline file (not a stage config). A file that cannot
    be read as a config raises its ConfigError (the real problem, not "not a pipeline file")."""
    return "stages" in read_yaml(path)


def _unknown(kind: str, key: str, valid: tuple[str, ...] | list[str]) -> str:
    hint = closest(key, list(valid))
    return f"unknown {kind} {key!r}; valid: {', '.join(valid)}" + (f" (did you mean {hint!r}?)" if hint else "")


def _parse_input(raw: Any, where: str, earlier: list[str]) -> dict[str, str | None]:
    if raw is None:
        return {}
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a stage name or a mapping with keys "
                          f"{', '.join(INPUT_KEYS)} (or `from`), got {raw!r}", where)
    raw = dict(raw)
    if "from" in raw:
        if "model" in raw:
            raise ConfigError(f"{where}: give one of `from` and `model` (they mean the same)", where)
        raw["model"] = raw.pop("from")
    out: dict[str, str | None] = {}
    for key, source in raw.items():
        if key not in INPUT_KEYS:
            raise ConfigError(f"{where}: {_unknown('input key', str(key), INPUT_KEYS + ('from',))}",
                              f"{where}.{key}")
        if source is not None and source not in earlier:
            raise ConfigError(f"{where}.{key}: {source!r} is not an earlier stage; earlier stages: "
                              f"{', '.join(earlier) or '(none)'}", f"{where}.{key}")
        out[key] = source
    return out


def _parse_eval(raw: Any, where: str) -> list[str] | None:
    if raw is None or raw is False:
        return None
    if raw is True:
        return []
    if isinstance(raw, dict) and set(raw) <= {"overrides"}:
        items = raw.get("overrides") or []
        if isinstance(items, list) and all(isinstance(x, str) for x in items):
            return list(items)
    raise ConfigError(f"{where}: expected true/false or {{overrides: [key=value, ...]}}, got {raw!r}", where)


def split_overrides(overrides: list[str] | tuple[str, ...], stage_names: list[str]
                    ) -> tuple[list[str], dict[str, list[str]]]:
    """Command-line overrides -> (root overrides, {stage: overrides}); `stages.<s>.<key>=v` targets s."""
    root: list[str] = []
    per_stage: dict[str, list[str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep:
            example = stage_names[0] if stage_names else "S"
            raise ConfigError(f"override {item!r} is not key=value (e.g. "
                              f"stages.{example}.algorithm.clip_high=4e-4 or output_dir=runs/x)", key or None)
        if parts[0] == "stages":
            if len(parts) < 3:
                raise ConfigError(f"override {item!r}: use stages.<stage>.<key>=value; stages: "
                                  f"{', '.join(stage_names)}", key)
            if parts[1] not in stage_names:
                raise ConfigError(f"override {item!r}: {_unknown('stage', parts[1], stage_names)}", key)
            per_stage.setdefault(parts[1], []).append(".".join(parts[2:]) + "=" + value)
        elif parts[0] in ("name", "output_dir", "overwrite") and len(parts) == 1:
            root.append(item)
        else:
            raise ConfigError(f"override {item!r}: a pipeline takes `output_dir=`, `name=`, `overwrite=` or "
                              f"`stages.<stage>.<key>=value` (stages: {', '.join(stage_names)})", key)
    return root, per_stage


def load_pipeline(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Pipeline:
    """Read a pipeline file and apply command-line overrides (schema checks only; see `resolve_stages`)."""
    data = read_yaml(path)
    base = os.path.dirname(os.path.abspath(path))
    for key in data:
        if key not in ROOT_KEYS:
            raise ConfigError(f"{path}: {_unknown('pipeline key', str(key), ROOT_KEYS)}", str(key))
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{path}: `stages` must be a non-empty list of {{name, config, ...}}", "stages")
    names = [s.get("name") if isinstance(s, dict) else None for s in raw_stages]
    root, per_stage = split_overrides(list(overrides), [n for n in names if isinstance(n, str)])
    data = apply_overrides({k: v for k, v in data.items() if k != "stages"}, root)
    stages: list[StageEntry] = []
    for i, raw in enumerate(raw_stages):
        where = f"stages.{i}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: {where} must be a mapping with keys {', '.join(STAGE_KEYS)}", where)
        for key in raw:
            if key not in STAGE_KEYS:
                raise ConfigError(f"{path}: {where}: {_unknown('stage key', str(key), STAGE_KEYS)}",
                                  f"{where}.{key}")
        name, config = raw.get("name"), raw.get("config")
        if not isinstance(name, str) or not name or "/" in name or "." in name:
            raise ConfigError(f"{path}: {where}.name must be a non-empty name without '/' or '.', got "
                              f"{name!r}", f"{where}.name")
        if name in names[:i]:
            raise ConfigError(f"{path}: two stages are named {name!r}; stage names must be unique",
                              f"{where}.name")
        if not isinstance(config, str):
            raise ConfigError(f"{path}: {where}.config (stage {name!r}) must be the path of a stage config",
                              f"{where}.config")
        config_path = config if os.path.isabs(config) else os.path.join(base, config)
        if not os.path.isfile(config_path):
            raise ConfigError(f"{path}: stage {name!r}: config {config!r} does not exist ({config_path})",
                              f"{where}.config")
        file_overrides = raw.get("overrides") or []
        if not isinstance(file_overrides, list) or not all(isinstance(x, str) for x in file_overrides):
            raise ConfigError(f"{path}: {where}.overrides must be a list of key=value strings",
                              f"{where}.overrides")
        stages.append(StageEntry(
            name=name, config=config_path, overrides=list(file_overrides) + per_stage.get(name, []),
            input=_parse_input(raw.get("input"), f"{where}.input", names[:i]),
            eval=_parse_eval(raw.get("eval"), f"{where}.eval")))
    eval_config, eval_overrides = _parse_root_eval(data.get("eval"), base, str(path))
    name = data.get("name") or Path(path).stem
    output_dir = data.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"{path}: output_dir is required (each stage writes <output_dir>/<stage name>)",
                          "output_dir")
    overwrite = data.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"{path}: overwrite must be true or false, got {overwrite!r}", "overwrite")
    return Pipeline(name=str(name), output_dir=output_dir, stages=stages, source_path=str(path),
                    eval_config=eval_config, eval_overrides=eval_overrides, overwrite=overwrite)


def _parse_root_eval(raw: Any, base: str, path: str) -> tuple[str | None, list[str]]:
    if raw is None:
        return None, []
    if not isinstance(raw, dict) or set(raw) - set(ROOT_EVAL_KEYS):
        raise ConfigError(f"{path}: `eval` must be a mapping with keys {', '.join(ROOT_EVAL_KEYS)}, got "
                          f"{raw!r}", "eval")
    config = raw.get("config")
    if config is not None:
        if not isinstance(config, str):
            raise ConfigError(f"{path}: eval.config must be the path of a config file", "eval.config")
        config = config if os.path.isabs(config) else os.path.join(base, config)
        if not os.path.isfile(config):
            raise ConfigError(f"{path}: eval.config {raw['config']!r} does not exist ({config})",
                              "eval.config")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(x, str) for x in overrides):
        raise ConfigError(f"{path}: eval.overrides must be a list of key=value strings", "eval.overrides")
    return config, list(overrides)
