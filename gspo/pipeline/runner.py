"""`gspo pipeline`: run stage configs in order, each starting from an earlier stage's output.

A pipeline file (YAML):

    name: tiny
    output_dir: runs/tiny/pipeline          # stage `s` writes <output_dir>/<s>; manifest.json, report.md here
    eval: {config: eval.yaml, overrides: []}  # optional: what `eval: true` stages are evaluated with
    stages:
      - name: cold_start
        config: cold_start.yaml             # relative to the pipeline file
      - name: reasoning_rl
        config: reasoning_rl.yaml
        overrides: [train.num_rollouts=60]  # applied after the wiring: an explicit value always wins
        input: {from: cold_start}           # optional: where the model comes from (default: see below)
        eval: true                          # optional: evaluate the stage's output afterwards (eval.json)

Wiring (the default, by stage type; every wired key is printed and stored in the manifest):
  - `model.name_or_path` of an sft / rl / rejection_sampling stage = the output of the nearest earlier stage
    that produces a policy (sft, rl);
  - `data.path` of an sft stage = the dataset of the nearest earlier rejection_sampling stage, when no other
    sft stage lies between them;
  - `rewards.<i>.kwargs.model_path` of every `reward_model` reward = the output of the nearest earlier
    reward_model stage.
  `input: {model: S, data: S, reward_model: S}` picks the source stage of each (`from: S` = `model: S`,
  a bare `input: S` too); `null` switches that wiring off, keeping the config's own value.

Evaluation (`eval: true` or `eval: {overrides: [...]}` on a stage): `gspo.training.evaluation.run_eval` on the stage's
output, with the root `eval.config` (else the stage's own resolved config), the root and stage eval overrides,
and its `reward_model` rewards wired to the nearest reward_model stage at or before this one.

Precedence inside one stage: stage config file < wiring < the stage's `overrides` < command-line
`stages.<stage>.<key>=value`. Root overrides: `output_dir=...`, `name=...`.

Resume: `<output_dir>/manifest.json` records every stage (status pending / running / done / failed, resolved
config and its hash, wiring, output, times, versions, git commit, summary metrics). Re-running the same
command skips a `done` stage whose output exists and whose resolved config is unchanged; an interrupted
`rl` stage resumes from `<stage dir>/checkpoints/latest`; other interrupted stages restart. A finished stage
whose config changed is an error naming the changed keys, unless `rerun=True` (`--rerun`): it then runs
again, and so does every stage after it (their inputs changed).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gspo.config import Config, ConfigError, apply_overrides, check_config, read_yaml, resolve_relative_paths
from gspo.pipeline.manifest import (
    changed_keys,
    config_hash,
    git_commit,
    now_utc,
    read_manifest,
    versions,
    write_manifest,
)
from gspo.pipeline.run_record import (
    OutputDirError,
    claim_output_dir,
    dir_entries,
    note_written,
    read_record,
    writable_problem,
)
from gspo.registry import STAGES, StageSpec, closest

# What each stage type consumes and produces comes from its `gspo.registry.StageSpec`.
# Artifact kinds that feed only the first consumer after their producer: rejection-sampled data is the SFT data
# of the next `sft` stage, not of every later one. (A policy or a reward model feeds every later consumer.)
CONSUMED_ONCE = ("data",)
ROOT_KEYS = ("name", "output_dir", "overwrite", "eval", "stages")
ROOT_EVAL_KEYS = ("config", "overrides")
STAGE_KEYS = ("name", "config", "overrides", "input", "eval")
INPUT_KEYS = ("model", "data", "reward_model")


# ----------------------------------------------------------------------------------------------------------
# The pipeline file
# ----------------------------------------------------------------------------------------------------------


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
    return f"unknown {kind} {key!r}; valid: {', '.join(valid)}" + (f" (did you mean {hint!r}?)" if hint
                                                                     else "")


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


# ----------------------------------------------------------------------------------------------------------
# Wiring and resolved stage configs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ResolvedStage:
    """A pipeline stage ready to run: its entry, its type, its checked config with the wiring applied."""

    spec: StageEntry
    type: str
    config: Config
    wiring: dict[str, dict[str, str]]  # key -> {"from": stage, "value": path}
    pending_inputs: list[str]  # wired keys whose artifact does not exist yet
    eval_config: Config | None = None  # what `eval:` runs on the stage's output
    eval_wiring: dict[str, dict[str, str]] = field(default_factory=dict)


def _stage_type(spec: StageEntry) -> str:
    data = apply_overrides(read_yaml(spec.config), spec.overrides)
    return str(data.get("stage", Config().stage))


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a YAML string: paths with ':' or '#' stay intact


def _stage_spec(stage_type: str) -> StageSpec | None:
    return STAGES.get(stage_type) if stage_type in STAGES else None  # unknown: check_config names it


def _produces(stage_type: str) -> str | None:
    spec = _stage_spec(stage_type)
    return spec.produces if spec else None


def _consumes(stage_type: str) -> tuple[str, ...]:
    spec = _stage_spec(stage_type)
    return spec.consumes if spec else ()


def _nearest(types: list[str], names: list[str], i: int, kind: str) -> str | None:
    """The nearest stage before stage i that produces `kind`; for a CONSUMED_ONCE kind, none past an earlier
    stage that consumes it too."""
    for j in range(i - 1, -1, -1):
        if _produces(types[j]) == kind:
            return names[j]
        if kind in CONSUMED_ONCE and kind in _consumes(types[j]):
            return None
    return None


def _sources(pipe: Pipeline, types: list[str], i: int,
             reward_model_rewards: list[int]) -> dict[str, str | None]:
    """Source stage of each input of stage i: explicit `input:` first, else the nearest earlier producer of
    each artifact kind its StageSpec consumes."""
    names, entry, consumes = pipe.names(), pipe.stages[i], _consumes(types[i])
    default: dict[str, str | None] = {
        "model": _nearest(types, names, i, "policy") if "policy" in consumes else None,
        "data": _nearest(types, names, i, "data") if "data" in consumes else None,
        "reward_model": _nearest(types, names, i, "reward_model") if reward_model_rewards else None,
    }
    default.update(entry.input)
    return default


def _reward_model_indices(data: dict[str, Any]) -> list[int]:
    out = []
    for i, r in enumerate(data.get("rewards") or []):
        fn = r if isinstance(r, str) else (r or {}).get("fn") if isinstance(r, dict) else None
        if fn == "reward_model":
            out.append(i)
    return out


def _wired_overrides(wiring: dict[str, dict[str, str]]) -> list[str]:
    out = [f"{k}={_yaml_str(w['value'])}" for k, w in wiring.items()]
    if "data.path" in wiring:
        out.insert(0, "data.task=null")  # a synthetic task and a data file are exclusive
    return out


def _build(raw: dict[str, Any], overrides: list[str], source: str, pending: list[str], where: str,
           problems: list[str], keys: list[str]) -> Config | None:
    """A checked Config, or None with the problems appended (errors on `pending` keys are expected)."""
    try:
        cfg = Config.from_dict(raw, overrides)
    except ConfigError as e:
        problems.append(f"{where} ({source}): {e}")
        keys += e.keys
        return None
    cfg.source_path = source
    resolve_relative_paths(cfg)
    errors = check_config(cfg)
    if not errors:  # the file checks of `gspo validate` (the pipeline manages the stage folders itself)
        from gspo.pipeline.preflight import preflight

        errors = preflight(cfg, output_dir=False, skip=tuple(pending))[0]
    for e in errors:
        if e.key not in pending:  # "does not exist (yet)": an earlier stage of this run writes it
            problems.append(f"{where} ({source}): {e}")
            keys += e.keys
    return cfg


def resolve_stages(pipe: Pipeline, outputs: dict[str, str] | None = None) -> list[ResolvedStage]:
    """Every stage's config with its wiring applied, checked. `outputs`: actual outputs of finished stages.

    Raises ConfigError listing every problem of every stage (prefixed `stage <name>:`). A wired input whose
    artifact does not exist yet is fine (the stage before it will write it).
    """
    from gspo.plugins import load_builtins

    load_builtins()  # the StageSpecs say what each stage type consumes and produces
    outputs = outputs or {}
    names, types = pipe.names(), [_stage_type(s) for s in pipe.stages]

    def output_of(stage: str) -> str:
        # Absolute, like the outputs a finished stage records: the wiring reads the same before and after.
        spec = _stage_spec(types[names.index(stage)])
        return outputs.get(stage) or os.path.abspath(os.path.join(
            pipe.stage_dir(stage), spec.output if spec else "final"))

    resolved: list[ResolvedStage] = []
    problems: list[str] = []
    keys: list[str] = []
    for i, spec in enumerate(pipe.stages):
        raw = read_yaml(spec.config)
        rm_rewards = _reward_model_indices(apply_overrides(raw, spec.overrides))
        wiring: dict[str, dict[str, str]] = {}
        for kind, source in _sources(pipe, types, i, rm_rewards).items():
            if source is None:
                continue
            targets = {"model": ["model.name_or_path"], "data": ["data.path"],
                       "reward_model": [f"rewards.{k}.kwargs.model_path" for k in rm_rewards]}[kind]
            wiring.update({key: {"from": source, "value": output_of(source)} for key in targets})
        pending = [k for k, w in wiring.items() if not os.path.exists(w["value"])]
        stage_dir = pipe.stage_dir(spec.name)
        n_keys = len(keys)
        cfg = _build(raw, _wired_overrides(wiring) + spec.overrides + [f"output_dir={_yaml_str(stage_dir)}"],
                     spec.config, pending, f"stage {spec.name!r}", problems, keys)
        keys[n_keys:] = [f"stages.{spec.name}.{k}" for k in keys[n_keys:]]
        if cfg is None:
            continue
        st = ResolvedStage(spec=spec, type=cfg.stage, config=cfg, wiring=wiring, pending_inputs=pending)
        if spec.eval is not None:
            # The pipeline's eval config (else the stage's own, as resolved) on this stage's output; a
            # reward_model reward scores with the nearest reward model trained at or before this stage.
            base = read_yaml(pipe.eval_config) if pipe.eval_config else cfg.to_dict()
            ev_wiring = {"model.name_or_path": {"from": spec.name, "value": output_of(spec.name)}}
            rm_source = (spec.name if _produces(types[i]) == "reward_model"
                         else _nearest(types, names, i, "reward_model"))
            ev_rm = _reward_model_indices(apply_overrides(base, pipe.eval_overrides + spec.eval))
            if ev_rm and rm_source is None:
                problems.append(f"stage {spec.name!r}: its eval uses a `reward_model` reward but no "
                                "reward_model stage runs before it; move the reward_model stage earlier or "
                                "drop that reward")
            for k in ev_rm if rm_source else []:
                ev_wiring[f"rewards.{k}.kwargs.model_path"] = {"from": rm_source,
                                                               "value": output_of(rm_source)}
            ev_over = (["model.tiny={}"] + _wired_overrides(ev_wiring) + pipe.eval_overrides + spec.eval
                       + [f"output_dir={_yaml_str(stage_dir)}", "resume_from=null"])
            st.eval_config = _build(base, ev_over, pipe.eval_config or spec.config, list(ev_wiring),
                                    f"stage {spec.name!r} eval", problems, keys)
            st.eval_wiring = ev_wiring
        resolved.append(st)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"pipeline {pipe.name!r}: {len(problems)} problem(s):\n{lines}",
                          keys[0] if keys else None, keys)
    return resolved


def describe(pipe: Pipeline, stages: list[ResolvedStage]) -> str:
    """The plan, as printed before a run and by `gspo validate PIPELINE`: stages, types, wiring, outputs."""
    lines = [f"pipeline {pipe.name!r} -> {pipe.output_dir}"]
    for i, st in enumerate(stages, 1):
        lines.append(f"  {i}. {st.spec.name} [{st.type}]  config {st.spec.config}")
        for key, w in st.wiring.items():
            note = "  (not written yet)" if key in st.pending_inputs else ""
            lines.append(f"       {key} <- {w['from']}: {w['value']}{note}")
        for o in st.spec.overrides:
            lines.append(f"       override {o}")
        if st.eval_config is not None:
            lines.append(f"       then: eval with {pipe.eval_config or 'the stage config'}"
                         + (f" ({' '.join(st.spec.eval)})" if st.spec.eval else ""))
            for key, w in st.eval_wiring.items():
                if key != "model.name_or_path":
                    lines.append(f"         eval {key} <- {w['from']}: {w['value']}")
        lines.append(f"       output -> {st.config.output_dir}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------


class PipelineError(RuntimeError):
    """A stage cannot run as asked (changed config of a finished stage, missing runner, failed stage)."""


def _entry(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    return next((s for s in manifest.get("stages", []) if s.get("name") == name), {})


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
    """Under `accelerate launch` one pipeline process runs per GPU: every process runs each stage (a stage
    is a distributed job), only the main one writes the manifest, clears stage directories and writes the
    report, and all of them meet at a barrier around each of those writes."""

    def __init__(self) -> None:
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState()

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
        later = manifest["stages"][manifest["stages"].index(entry) + 1:]
        for e in later:
            if e.get("status") != "pending":
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
    if procs.main:
        note_written(cfg.output_dir)
        # Recorded before the evaluation: a failed evaluation never costs the trained stage.
        entry.update({"status": "trained", "output": os.path.abspath(output) if output else None,
                      "wall_s": round(time.time() - start, 3)})
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
    """The stage's evaluation (main process only: one engine, one eval.json), then status done."""
    from gspo.pipeline.report import stage_summary

    output = entry.get("output")
    start = time.time()
    if st.eval_config is not None and output and procs.main:
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


