"""Each stage's config with its inputs wired to earlier stages' outputs, checked before anything runs.

The defaults come from each stage type's `StageSpec` (what it consumes and produces): a consumed artifact kind
is wired from the nearest earlier stage producing it; `input:` picks other sources or switches a wiring off.
The table, `input:`, evaluation and precedence: docs/pipeline.md ("Wiring", "Overrides"). Every wired key is
printed and stored in the manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from gspo.config import Config, ConfigError, apply_overrides, check_config, read_yaml, resolve_relative_paths
from gspo.pipeline.pipeline_file import Pipeline, StageEntry
from gspo.registry import STAGES, StageSpec

# Artifact kinds that feed only the first consumer after their producer: rejection-sampled data is the SFT data
# of the next `sft` stage, not of every later one. (A policy or a reward model feeds every later consumer.)
CONSUMED_ONCE = ("data",)


# -- Wiring and resolved stage configs -----------------------------------------------------------------------


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
    return getattr(_stage_spec(stage_type), "produces", None)


def _consumes(stage_type: str) -> tuple[str, ...]:
    return getattr(_stage_spec(stage_type), "consumes", ())


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
    """Indices of the `reward_model` rewards, written as a bare string or as a mapping's `fn`."""
    return [i for i, r in enumerate(data.get("rewards") or [])
            if (r.get("fn") if isinstance(r, dict) else r) == "reward_model"]


def _wired_overrides(wiring: dict[str, dict[str, str]]) -> list[str]:
    out = [f"{k}={_yaml_str(w['value'])}" for k, w in wiring.items()]
    if "data.path" in wiring:
        out.insert(0, "data.task=null")  # a synthetic task and a data file are exclusive
    return out


def _build(raw: dict[str, Any], overrides: list[str], source: str, pending: list[str], where: str,
           problems: list[str], keys: list[str], *, evaluation: bool = False) -> Config | None:
    """A checked Config, or None with the problems appended (errors on `pending` keys are expected).
    `evaluation`: the config of an evaluation (run_eval reads model, data, rollout, rewards and eval; not its
    stage)."""
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

        errors = preflight(cfg, output_dir=False, skip=tuple(pending), evaluation=evaluation)[0]
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
                                    f"stage {spec.name!r} eval", problems, keys, evaluation=True)
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

