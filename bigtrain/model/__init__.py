"""The pure decoder model and its configuration."""
from bigtrain.model.config import PRESETS, ModelConfig, count_parameters, flops_per_token
from bigtrain.model.decoder import Decoder, build_on_meta, materialize

__all__ = ["PRESETS", "Decoder", "ModelConfig", "build_on_meta", "count_parameters", "flops_per_token", "materialize"]
