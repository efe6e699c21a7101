from .config import PRESETS, MixtureConfig, from_name
from .decoder import MixtureLM, ModelOutput, count_parameters, pad_left

__all__ = ["PRESETS", "MixtureConfig", "MixtureLM", "ModelOutput", "count_parameters", "from_name", "pad_left"]
