"""Multi-stage runs: the pipeline file and its runner (`gspo.pipeline.runner`), the manifest, the run report,
the output-folder record and the checks before a run. The runner's public names are importable from here."""

from gspo.pipeline.runner import (  # noqa: F401
    Pipeline,
    PipelineError,
    ResolvedStage,
    StageEntry,
    check_pipeline_dirs,
    describe,
    is_pipeline_file,
    load_pipeline,
    plan_stage,
    resolve_stages,
    run_eval_for,
    run_pipeline,
    split_overrides,
    validate_pipeline,
)
