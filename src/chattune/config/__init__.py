"""The run configuration: small nested dataclasses, one schema for YAML files and command-line flags.

Precedence: dataclass defaults < YAML file (--config) < command-line flags. Every value is validated at
the boundary, and errors name the field (`train.lr`). The resolved config is written to each run's output
directory; it holds no secrets (tokens come from the environment).

schema (the dataclasses) -> values (YAML and flag values coerced into them) -> checks (validate).
"""

from chattune.config.checks import validate
from chattune.config.schema import (
                                    DPO_LOSS_TYPES,
                                    DPO_TRAIN_DEFAULTS,
                                    FORMATS,
                                    SECTIONS,
                                    TRACKERS,
                                    Config,
                                    DataConfig,
                                    DatasetEntry,
                                    DpoConfig,
                                    LoraConfig,
                                    ModelConfig,
                                    TrainConfig,
                                    fields_of,
                                    opt,
)
from chattune.config.values import apply_values, load_yaml, read_saved

__all__ = ["DPO_LOSS_TYPES", "DPO_TRAIN_DEFAULTS", "FORMATS", "SECTIONS", "TRACKERS", "Config", "DataConfig",
           "DatasetEntry", "DpoConfig", "LoraConfig", "ModelConfig", "TrainConfig", "apply_values", "fields_of",
           "load_yaml", "opt", "read_saved", "validate"]
