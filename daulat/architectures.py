"""Which architecture a config's [model] table builds: DeepSeek-V3 unless its `model_type` says otherwise.

    [model]
    model_type = "deepseek_v32"   # or "deepseek_v4"; absent or "deepseek_v3": DeepSeek-V3
    index_topk = 64               # ... and the fields of that architecture's config

The names are transformers' `model_type`s, so a preset says what its checkpoints' config.json will.
Every stage that builds a fresh model (pretrain, a fresh distillation student, `daulat init`) reads
[model] through `ModelSection` and builds it with `build_model`; checkpoints name their own
architecture in config.json and are read by daulat.checkpoint.
"""

from __future__ import annotations

from typing import NamedTuple

from daulat.errors import DaulatError
from daulat.model import DeepseekV3, ModelConfig
from daulat.model_v4 import DeepseekV4, ModelConfigV4
from daulat.model_v32 import DeepseekV32, DeepseekV32Config


class Family(NamedTuple):
    config: type
    model: type


MODEL_TYPES = {
    "deepseek_v3": Family(ModelConfig, DeepseekV3),
    "deepseek_v32": Family(DeepseekV32Config, DeepseekV32),
    "deepseek_v4": Family(ModelConfigV4, DeepseekV4),
}
DEFAULT = "deepseek_v3"


class ModelSection:
    """The [model] section of a config schema: daulat.config builds the dataclass `choose` names."""

    @staticmethod
    def choose(section: str, values: dict) -> tuple[type, dict]:
        """The config class of a [model] table and the table without its `model_type` key."""
        values = dict(values)
        name = values.pop("model_type", DEFAULT)
        if name not in MODEL_TYPES:
            raise DaulatError(f"config {section}.model_type = {name!r}: expected one of {', '.join(MODEL_TYPES)}")
        return MODEL_TYPES[name].config, values


def build_model(config):
    """A freshly initialised model of the config's architecture (its class's `model_type`)."""
    return MODEL_TYPES[config.model_type].model(config)
