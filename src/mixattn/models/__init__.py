from .config import PRESETS, MixtureConfig, from_name
from .decoder import MixtureLM, ModelOutput, count_parameters

__all__ = ["PRESETS", "MixtureConfig", "MixtureLM", "ModelOutput", "count_parameters", "from_name"]
