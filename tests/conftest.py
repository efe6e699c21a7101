"""Shared fixtures. Markers ``slow`` and ``gpu`` are deselected by default (see pyproject)."""

import pytest
import torch

from mixattn.layers import AttnContext, RotaryEmbedding


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_ctx(T: int, head_dim: int, offset: int = 0, cache=None, theta: float = 10000.0) -> AttnContext:
    cos, sin = RotaryEmbedding(head_dim, theta)(torch.arange(offset, offset + T))
    return AttnContext(cos, sin, offset, cache)


def grads(out: torch.Tensor, tensors, seed: int = 1):
    """Gradients of a random projection of ``out`` (avoids expanded grads from .sum())."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, tensors, g, allow_unused=True)
