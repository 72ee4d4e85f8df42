"""The `gspo` command: parse, validate, dispatch. No training logic lives here.

    gspo validate CONFIG [key=value ...]   check a stage config (or a pipeline file: every stage, wired)
    gspo train CONFIG [key=value ...]      validate, then run the config's stage
    gspo pipeline PIPELINE [key=value ...] run the stages of a pipeline file in order (resumable);
                                           --dry-run: validate, print the plan; --rerun: docs/pipeline.md
    gspo eval CONFIG [key=value ...]       pass@1 / pass@k of the config's model; writes OUTPUT_DIR/eval.json
    gspo report OUTPUT_DIR                 rebuild a pipeline's report.md, plots and per-stage table
    gspo config-reference                  print the config reference (docs/config.md)
    gspo env                               torch / CUDA / vLLM / transformers / peft / GPU, and any mismatch

Config errors print `error: <message>` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from gspo.config import Config, ConfigError, RewardSpec, is_required, load_config, type_name
from gspo.launch import launch_processes, launch_rank
from gspo.pipeline.run_record import OutputDirError, claim_output_dir, note_written

EXIT_USAGE = 2  # a config / usage mistake, found before anything ran
EXIT_FAILED = 1  # a run that started and failed (a reward error, a full disk, ...)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gspo", description="GSPO post-training for Mixture-of-Experts models.")
    p.add_argument("--debug", action="store_true",
                   help="print the full traceback of an error (user errors print one line without it)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], help: str,
                overrides: str | None = None) -> argparse.ArgumentParser:
        """A subcommand run by `run(args)`; `overrides` (their help) adds CONFIG and the `key=value` list."""
        c = sub.add_parser(name, help=help)
        c.set_defaults(run=run)
        if overrides:
            c.add_argument("config")
            c.add_argument("overrides", nargs="*", help=overrides)
        return c

    overrides_help = "overrides `key.sub=value` (value parsed as YAML), applied after the file"
    v = command("validate", _validate, "check a config without loading a model; print a summary",
                overrides_help)
    v.add_argument("--print-config", action="store_true", help="also print the full resolved config as YAML")
    command("train", _train, "validate a config, then run its stage", overrides_help)
    pl = command("pipeline", _pipeline, "run a multi-stage pipeline file (resumes where it stopped)",
                 "`stages.<stage>.<key>=value` (one stage) or `output_dir=...`")
    pl.add_argument("--dry-run", action="store_true",
                    help="validate every stage with its wiring; run nothing")
    pl.add_argument("--rerun", action="store_true",
                    help="run a finished stage whose config changed again (and every stage after it)")
    pl.add_argument("--no-report", action="store_true", help="skip report.md and the plots at the end")
    sv = command("serve", _serve, "run the config's rollout engine as a server (rollout.engine=vllm_server "
                 "attaches to it with rollout.server_url)", overrides_help)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this host only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    command("eval", _eval, "pass@1 / pass@k of the config's model on its data and rewards", overrides_help)
    command("report", _report, "rebuild a pipeline run's report.md, plots and per-stage table").add_argument(
        "output_dir")
    command("stages", lambda args: _print(stages_table()),
            "print the registered stages as a markdown table (docs/stages.md has it)")
    command("env", _env, "print torch / CUDA / vLLM / transformers / peft / GPU and name any mismatch")
    command("config-reference", lambda args: _print(config_reference(), end=""),
            "print the config reference as markdown").add_argument(
        "--markdown", action="store_true", help="(default) markdown output")
    return p


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _preflight(cfg: Config, skip: tuple[str, ...] = ()) -> int:
    """gspo.pipeline.preflight's checks: notes on stdout, one `error:` line per problem; EXIT_USAGE if any."""
    from gspo.pipeline.preflight import preflight

    problems, notes = preflight(cfg, skip=skip)
    for note in notes:
        print(f"note: {note}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return EXIT_USAGE if problems else 0


def summary(cfg: Config) -> str:
    """A short resolved view: the facts a user checks before spending GPU time (those of its stage)."""
    from gspo.registry import STAGES

    spec = STAGES.get(cfg.stage)  # load_config checked the name
    runner = "" if spec.runner else "  [no runner registered: `gspo train` is not available yet]"
    lines = [
        f"stage:      {cfg.stage}{runner}",
        f"model:      {cfg.model.name_or_path} ({cfg.model.dtype}, experts={cfg.model.experts_implementation}"
        + (f", LoRA r={cfg.lora.r}" if cfg.lora.enabled else "") + ")",
        "data:       " + (f"task {cfg.data.task} ({cfg.data.num_samples} rows)" if cfg.data.task
                           else f"{cfg.data.path} [{cfg.data.split}]"),
    ]
    lines += spec.summary(cfg) if spec.summary else []
    lines += [
        "rewards:    " + (", ".join(f"{s.name or s.fn} x {s.weight:g}" for s in cfg.rewards) or "(none)"),
        f"output_dir: {cfg.output_dir}" + (f" (resume from {cfg.resume_from})" if cfg.resume_from else ""),
    ]
    return "\n".join(lines)


def _validate(args: argparse.Namespace) -> int:
    from gspo.pipeline import is_pipeline_file

    if is_pipeline_file(args.config):
        return _validate_pipeline(args)
    cfg = load_config(args.config, args.overrides)
    problems = _preflight(cfg)
    if problems:
        return problems
    print(summary(cfg))
    if args.print_config:
        print("---")
        print(cfg.to_yaml(), end="")
    print("config OK")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """`gspo serve CONFIG`: the engine the config's rl stage would sample with, in this process, over HTTP
    (gspo/rollout/vllm_server.py). A tiny model is built in a temporary folder (the trainer pushes its own
    weights before the first rollout, so the server's copy only has to share the architecture)."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from gspo.data import build_dataset, prompt_token_ids
    from gspo.models.loading import resolve_model_path
    from gspo.rollout.server import serve

    cfg = load_config(args.config, args.overrides)
    problems = _preflight(cfg, skip=("rollout.server_url",))  # this command is what will answer there
    if problems:
        return problems
    m, r = cfg.model, cfg.rollout
    tiny = m.name_or_path.startswith("tiny:")
    where = tempfile.mkdtemp(prefix="gspo-serve-") if tiny else cfg.output_dir
    path = resolve_model_path(m.name_or_path, where, seed=cfg.seed, dtype=m.dtype, tiny=m.tiny)
    tok_path = m.tokenizer or path
    max_len = r.max_model_len
    if max_len is None:  # as the trainer sizes it (gspo/training/trainer.py _default_max_len, without eval)
        tok = AutoTokenizer.from_pretrained(tok_path)
        rows = build_dataset(cfg.data, seed=cfg.seed).rows
        max_len = max(len(prompt_token_ids(tok, x["prompt"], cfg.data.chat_template)) for x in rows) \
            + r.max_new_tokens + 8
    print(f"serving {m.name_or_path} ({cfg.rollout_dtype}, max_model_len {max_len}) on "
          f"http://{args.host}:{args.port}; attach with rollout.engine=vllm_server "
          f"rollout.server_url=http://{args.host}:{args.port}", flush=True)
    try:
        serve(path, tok_path, dtype=cfg.rollout_dtype, seed=cfg.seed, max_model_len=max_len,
              max_num_seqs=r.prompts_per_step * r.group_size, host=args.host, port=args.port,
              kv_cache_memory_bytes=r.kv_cache_memory_bytes, gpu_memory_utilization=r.gpu_memory_utilization,
              enforce_eager=r.enforce_eager)
    finally:
        if tiny:  # the temporary folder this command made
            shutil.rmtree(where, ignore_errors=True)
    return 0


def _train(args: argparse.Namespace) -> int:
    from gspo.pipeline import is_pipeline_file
    from gspo.registry import STAGES

    if is_pipeline_file(args.config):
        return _fail(f"{args.config!r} is a pipeline file (it has `stages:`); run it with "
                     f"`gspo pipeline {args.config}`")
    cfg = load_config(args.config, args.overrides)
    spec = STAGES.get(cfg.stage)  # load_config checked the name
    if spec.runner is None:
        return _fail(f"stage {cfg.stage!r} is not available yet (stages with a runner: "
                     f"{', '.join(n for n, s in STAGES.items() if s.runner) or 'none'})")
    problems = _preflight(cfg)  # the same checks as `gspo validate`, before any model loads
    if problems:
        return problems
    main = launch_rank() == 0  # several processes: rank 0 prints and owns the folder (the stage waits for it)
    if main:
        print(summary(cfg), flush=True)
        # The folder becomes this run's (gspo_run.json) or the run is refused: nothing of an earlier run or
        # of someone else is deleted or overwritten unasked.
        claim_output_dir(cfg.output_dir, stage=cfg.stage, resume=cfg.resume_from is not None,
                         overwrite=cfg.overwrite)
        # The resolved config next to the outputs: `gspo train OUTPUT_DIR/config.yaml overwrite=true` (or
        # with another output_dir), run from the same directory, repeats the run.
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(cfg.to_yaml())
    try:
        result = spec.runner(cfg)
    finally:
        if main:
            note_written(cfg.output_dir)
    if result and main:
        print(f"done: {result}")
    return 0


def _validate_pipeline(args: argparse.Namespace) -> int:
    from gspo.pipeline import describe, validate_pipeline

    pipe, stages = validate_pipeline(args.config, args.overrides)
    print(describe(pipe, stages))
    for st in stages:
        print(f"--- {st.spec.name}")
        print(summary(st.config))
        if getattr(args, "print_config", False):
            print(st.config.to_yaml(), end="")
    print("pipeline OK")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from gspo.pipeline import PipelineError, is_pipeline_file, load_pipeline, run_pipeline

    if not is_pipeline_file(args.config):
        return _fail(f"{args.config!r} is not a pipeline file (no top-level `stages:` list); "
                     f"run a single stage with `gspo train {args.config}`")
    if args.dry_run:
        return _validate_pipeline(args)
    try:
        run_pipeline(load_pipeline(args.config, args.overrides), rerun=args.rerun, report=not args.no_report)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _eval(args: argparse.Namespace) -> int:
    from gspo.training.evaluation import run_eval

    cfg = load_config(args.config, args.overrides)
    if not cfg.rewards:
        return _fail("rewards: `gspo eval` scores samples with the config's reward functions and it has none; "
                     "add e.g. `rewards: [synthetic_accuracy]` (or use an eval config such as recipes/tiny/eval.yaml)")
    result = run_eval(cfg)  # writes OUTPUT_DIR/eval.json (several processes: each samples its share, rank 0 writes)
    if launch_rank() != 0:
        return 0
    # pass@1 / pass@k first, then the other numbers (mean rewards: accuracy, format rate, ...).
    for key in sorted(result, key=lambda k: (not k.startswith("pass@"), k)):
        if isinstance(result[key], (int, float)) and not isinstance(result[key], bool):
            print(f"{key}: {result[key]:.4g}")
    print(f"wrote {os.path.join(cfg.output_dir, 'eval.json')}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from gspo.pipeline.report import write_report

    try:
        print(write_report(args.output_dir))
    except FileNotFoundError as e:
        return _fail(str(e))
    print(f"wrote {os.path.join(args.output_dir, 'report.md')}")
    return 0


# -- The config reference (docs/config.md is this function's output) -----------------------------------------


def _fmt_default(f: Any) -> str:
    value = f.default_factory() if f.default_factory is not None else f.default
    if isinstance(value, BaseModel):
        return ""
    if is_required(f):
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list):
        return "`[" + ", ".join(map(str, value)) + "]`"
    return f"`{value!r}`"


_SIGNS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


def _table(cls: type, prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, f in cls.model_fields.items():
        # pydantic keeps a field's bounds as annotated_types metadata (Ge(ge=1), ...), lower bound first.
        bounds = [(op, getattr(m, op)) for m in f.metadata if (op := type(m).__name__.lower()) in _SIGNS]
        help_text = " ".join([f.description or ""] + [f"({_SIGNS[op]} {v})" for op, v in bounds])
        rows.append(f"| `{prefix}{name}` | {type_name(f.annotation).replace('|', '&#124;')} | "
                    f"{_fmt_default(f)} | {help_text.replace('|', '&#124;')} |")
    return rows


def config_reference() -> str:
    """The markdown reference of every config key, generated from the field definitions."""
    out = [
        "# Config reference",
        "",
        "<!-- Generated by `gspo config-reference > docs/config.md`; edit the fields in gspo/config/sections.py. -->",
        "",
        ("One YAML file per stage. Precedence: field default < YAML file < command-line override "
         "(`gspo train CONFIG key.sub=value ...`, the value parsed as YAML: `algorithm.clip_high=4e-4`, "
         "`lora.target_modules=[q_proj,v_proj]`, `model.tiny.num_experts=8`, `rewards.0.weight=0.5`). "
         "`gspo validate CONFIG` checks a config without loading a model."),
        "",
        ("Relative paths: an input path (`data.path`, `model.name_or_path`, `rejection.mix_path`, "
         "`resume_from`, a reward file, a reward's `kwargs.model_path`) is looked up next to the config file "
         "first; when nothing is there but it exists relative to the current directory, that one is used and "
         "the fallback is logged. `output_dir` is relative to the current directory. An output_dir holding "
         "another run or files gspo did not write is refused unless `overwrite: true` (gspo_run.json in the "
         "folder lists what gspo wrote; only that is ever deleted)."),
        "",
        ("Unknown keys, wrong types and invalid choices are errors that name the key. `gspo validate` also "
         "checks the rules that span fields: `rollout.prompts_per_step * rollout.group_size` divisible by "
         "`algorithm.num_minibatches`; a sequence-level algorithm (gspo, gspo_token) with a clip ≥ 0.01 "
         "needs `algorithm.allow_wide_clip: true`; `lora.target_parameters` needs `lora.enabled`; "
         "`model.tiny` needs a `tiny:` model and only fields of that family's transformers config; exactly "
         "one of `data.task` / `data.path`; a local `data.path` must exist; stage `rl` needs a reward; and "
         "every name (stage, loss, engine, task, KL estimator, reward function, tiny family) must be "
         "registered."),
        "",
        "## Top level",
        "",
    ]
    fields = Config.model_fields
    sections = [name for name, f in fields.items() if isinstance(f.annotation, type)
                and issubclass(f.annotation, BaseModel)]
    rows = _table(Config, "")
    out += rows[:2] + [r for r, name in zip(rows[2:], fields) if name not in sections + ["rewards"]] + [""]
    for name in sections:
        f = fields[name]
        out += [f"## `{name}`", "", f.description, ""] + _table(f.annotation, f"{name}.") + [""]
    out += ["## `rewards`", "", fields["rewards"].description + " " + (RewardSpec.__doc__ or ""),
            "Each item:", ""] + _table(RewardSpec, "rewards.N.") + [""]
    return "\n".join(out)


def stages_table() -> str:
    """The markdown table of every registered stage, generated from its `StageSpec` (in docs/stages.md)."""
    from gspo.plugins import load_builtins
    from gspo.registry import STAGES

    load_builtins()
    rows = ["| stage | what it does | config sections | consumes | artifact |", "|---|---|---|---|---|"]
    for name, s in STAGES.items():
        sections = ", ".join(f"`{x}`" for x in s.sections) or "-"
        consumes = ", ".join(s.consumes) or "-"
        rows.append(f"| `{name}` | {s.help} | {sections} | {consumes} | {s.produces or '-'}: "
                    f"`OUTPUT_DIR/{s.output}` |")
    return "\n".join(rows)


class _StderrHandler(logging.Handler):
    """Writes to the sys.stderr of the moment (a StreamHandler keeps the one it was created with)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _print(text: str, end: str = "\n") -> int:
    print(text, end=end)
    return 0


def _env(args: argparse.Namespace) -> int:
    """Exit status 1 when a mismatch is found (scripts can gate on it)."""
    from gspo.envinfo import collect, mismatches, render

    rep = collect()
    print(render(rep))
    return 1 if mismatches(rep) else 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    log = logging.getLogger("gspo")
    if not log.handlers:  # the library's info lines (path fallbacks, resume points) on stderr
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[gspo] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    debug = "--debug" in argv  # anywhere on the line (`gspo train CFG --debug` as well as `gspo --debug ...`)
    argv = [a for a in argv if a != "--debug"]
    # Overrides may come after options too (`gspo pipeline P.yaml --dry-run stages.rl.seed=1`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except (ConfigError, OutputDirError) as e:
        if debug:
            raise
        return _fail(str(e))
    except user_errors() as e:
        # A failure the user can act on (a reward that failed, a full disk, a missing file): one line, the
        # traceback only with --debug.
        if debug:
            raise
        from gspo.training.distributed import PeerFailed

        # Another process failed and printed its own line; rank 0 names it once for the whole launch.
        if not isinstance(e, PeerFailed) or launch_rank() == 0:
            print(f"error: {describe_error(e)} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILED


def entry() -> None:
    """The `gspo` command and `python -m gspo`: `main()`, then the exit.

    A process of a multi-process launch (torchrun, accelerate launch) leaves through `os._exit` after Python's
    own exit handlers have run (atexit, weakref finalizers: temporary folders, logging): in the interpreter's
    final teardown, native threads of torch.distributed's stack aborted a finished rank now and then ("terminate
    called without an active exception", exit -6; measured on CPU/gloo: 1 run in 4 to 8, on the rank that
    failed and on ranks that finished cleanly), so the launcher reported a failed job for a run that had ended
    with its own status. One process exits normally."""
    code = main()
    if launch_processes()[0] > 1:
        import atexit

        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(code)
    raise SystemExit(code)


def user_errors() -> tuple[type[BaseException], ...]:
    from gspo.models.finite import NonFiniteError
    from gspo.pipeline import PipelineError
    from gspo.rewards import RewardError, RewardLoadError
    from gspo.rollout.vllm_server import RolloutServerError
    from gspo.training.distributed import PeerFailed

    return (OSError, RewardError, RewardLoadError, PipelineError, NonFiniteError, RolloutServerError, PeerFailed)


def describe_error(e: BaseException) -> str:
    """One line: an OSError as `<cause>: <path>` ("No space left on device: runs/x/metrics.jsonl")."""
    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    raise SystemExit(main())
