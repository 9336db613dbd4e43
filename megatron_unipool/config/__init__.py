"""Typed, validated run configuration (one JSON file, `--set section.key=value` overrides)."""
from .json_files import ConfigError
from .loading import (apply_overrides, config_from_dict, config_to_dict, load_config, overridden_fields,
                      parse_override, with_overrides)
from .sections import (
    MOE_LOSSES,
    CheckpointConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
    as_blend,
    stage_layers,
)
