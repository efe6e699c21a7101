"""RMSNorm and the dense SwiGLU feed-forward (Llama; Shazeer 2020, "GLU Variants Improve Transformer").

Legend: B batch, T tokens, d hidden dim, f ffn dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packed import fused_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 as Llama does; the weight multiplies after casting back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


GATE_UP = ("gate_proj", "up_proj")


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x)). (B, T, d) -> (B, T, d)."""

    PACK_GROUPS = (GATE_UP,)  # one prepacked call for both (``layers.packed``)

    def __init__(self, hidden_dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(hidden_dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = fused_linear(self, GATE_UP, x)
        g, u = gate_up if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(g) * u)
