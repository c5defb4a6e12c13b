"""The subjects of the study: matched dense and MoE transformers, their configs and accounting."""

from models.accounting import FlopConvention, count_params, forward_flops, summary, training_flops_per_token
from models.config import ConfigError, Dispatch, ModelConfig, MoEConfig, QKNorm, Routing, load_config
from models.matching import MatchReport, match_moe

__all__ = [
    "ConfigError",
    "Dispatch",
    "FlopConvention",
    "MatchReport",
    "MoEConfig",
    "ModelConfig",
    "QKNorm",
    "Routing",
    "count_params",
    "forward_flops",
    "load_config",
    "match_moe",
    "summary",
    "training_flops_per_token",
]
