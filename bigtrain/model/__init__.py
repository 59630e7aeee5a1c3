"""The pure decoder model and its configuration."""
from bigtrain.model.config import PRESETS, ModelConfig, count_parameters, flops_per_token
from bigtrain.model.decoder import Decoder, build_on_meta, materialize

__all__ = ["PRESETS", "ModelConfig", "Decoder", "build_on_meta", "materialize", "count_parameters", "flops_per_token"]
