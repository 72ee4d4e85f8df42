"""Multi-stage runs: the pipeline file (`pipeline_file`), the wiring of each stage's inputs (`wiring`), the
runner (`runner`), the manifest, the run report, the output-folder record and the checks before a run. The
names a caller needs are importable from here."""

from gspo.pipeline.pipeline_file import (
    Pipeline,
    StageEntry,
    is_pipeline_file,
    load_pipeline,
    split_overrides,
)
from gspo.pipeline.runner import (
    PipelineError,
    check_pipeline_dirs,
    plan_stage,
    run_eval_for,
    run_pipeline,
    validate_pipeline,
)
from gspo.pipeline.wiring import ResolvedStage, describe, resolve_stages
