"""Shared checks and tensor copying for conversions."""

from __future__ import annotations

from ..models.config import MixtureConfig
from ..models.decoder import MixtureLM


def require_dense(cfg: MixtureConfig, what: str, attention=True, ffn=False) -> None:
    """Conversions start from dense layers; anything else is a clear error naming the layer."""
    for i in range(cfg.num_layers):
        if attention and cfg.attention_at(i) != "dense":
            raise ValueError(f"{what} needs dense attention; layer {i} is {cfg.attention_at(i)!r}")
        if ffn and cfg.ffn_at(i) != "dense":
            raise ValueError(f"{what} needs dense FFNs; layer {i} is {cfg.ffn_at(i)!r}")


def copy_shared(src: MixtureLM, dst: MixtureLM, skip: tuple[str, ...]) -> None:
    """Copy every tensor whose name contains none of ``skip`` (embeddings, norms, head, FFNs...)."""
    want = dst.state_dict()
    state = {k: v for k, v in src.state_dict().items() if not any(s in k for s in skip) and k in want}
    dst.load_state_dict(state, strict=False)
