"""Typed run configuration: the schema (`gspo.config.schema`: `Config` and loading; its sections in
`gspo.config.sections`, the rules across them in `gspo.config.checks`), YAML reading and overrides
(`gspo.config.parse`).

The names a caller needs are importable from `gspo.config` itself.
"""

from gspo.config.checks import check_config
from gspo.config.parse import (
    SHORTHAND_FIELD,
    ConfigError,
    apply_overrides,
    is_required,
    read_yaml,
    type_name,
)
from gspo.config.schema import Config, load_config, resolve_input_path, resolve_relative_paths
from gspo.config.sections import (
    DEFAULT_REWARD_TIMEOUT_S,
    AlgorithmConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LoRAConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    RejectionConfig,
    RewardModelConfig,
    RewardSpec,
    RolloutConfig,
    SFTConfig,
    TrainConfig,
)
