"""mixattn: transformers whose attention is a mixture.

Public API:
    MixtureConfig, MixtureLM, PRESETS, from_name   models and presets
    load(path), save(model, path)                  checkpoints
    train, TrainConfig, load_corpus                training on offline corpora
"""

from .models import PRESETS, MixtureConfig, MixtureLM, ModelOutput, count_parameters, from_name
from .models.checkpoint import save
from .train.data import ByteTokenizer, load_corpus
from .train.loop import TrainConfig, train

__version__ = "0.1.0"


def load(source) -> MixtureLM:
    """Load a model: a mixattn checkpoint directory (config.json + model.safetensors).

    Raises FileNotFoundError for a missing path and ValueError for anything it cannot read,
    naming the file and the first mismatched key.
    """
    from pathlib import Path

    from .models import checkpoint

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    return checkpoint.load(path)


__all__ = [
    "PRESETS", "ByteTokenizer", "MixtureConfig", "MixtureLM", "ModelOutput", "TrainConfig", "count_parameters",
    "from_name", "load", "load_corpus", "save", "train",
]
