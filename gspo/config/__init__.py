"""Typed run configuration: the schema (`gspo.config.schema`), YAML reading and overrides (`gspo.config.parse`).

The names a caller needs are importable from `gspo.config` itself.
"""

from gspo.config.parse import (
    SHORTHAND_FIELD,
    ConfigError,
    apply_overrides,
    is_required,
    read_yaml,
    type_name,
)
from gspo.config.schema import (
    DEFAULT_REWARD_TIMEOUT_S,
    AlgorithmConfig,
    Config,
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
    check_config,
    load_config,
    resolve_input_path,
    resolve_relative_paths,
)
