"""Mixture layers: one file per family. See each file's docstring for its paper."""

from .attention import Attention, AttentionConfig, AttnContext, LayerOutput, RotaryEmbedding
from .bam import BAMAttention, BAMSharedKVAttention
from .cache import KVCache
from .experts import ExpertLinear, make_dispatch
from .moa import MoAAttention, MoAConfig
from .moe import MoE, MoEConfig
from .moh import MoHAttention, MoHConfig
from .norm import RMSNorm, SwiGLU
from .rcmha import ConvKVCache, RCMHAConfig, RCMHAttention
from .routers import Router, RouterConfig, RouterOutput

__all__ = [
    "Attention", "AttentionConfig", "AttnContext", "BAMAttention", "BAMSharedKVAttention", "ConvKVCache",
    "ExpertLinear", "RCMHAConfig", "RCMHAttention",
    "KVCache", "LayerOutput", "MoAAttention", "MoAConfig", "MoE", "MoEConfig", "MoHAttention", "MoHConfig",
    "RMSNorm", "Router", "RouterConfig", "RouterOutput", "RotaryEmbedding", "SwiGLU", "make_dispatch",
]
