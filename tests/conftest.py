"""Shared fixtures. Markers ``slow`` and ``gpu`` are deselected by default (see pyproject)."""

import pytest
import torch

from mixattn.layers import AttnContext, RotaryEmbedding


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _kernel_choices(tmp_path_factory):
    """The kernel autotuner's choices go to a file of this test session, not the user's cache, and its
    timing is off (``auto`` takes each op's first candidate): a test must neither depend on another
    run's timings, nor on this machine's load, nor leave its own behind."""
    import os

    set_here = []
    if not os.environ.get("MIXATTN_KERNEL_CHOICES"):
        os.environ["MIXATTN_KERNEL_CHOICES"] = str(tmp_path_factory.mktemp("kernels") / "kernel_choices.json")
        set_here.append("MIXATTN_KERNEL_CHOICES")
    # timing off: which kernel ``auto`` runs must not depend on the machine's load (a loaded run once
    # picked a different decode kernel than an idle one); every implementation has its own tests, and
    # the autotuner's tests turn timing back on
    if "MIXATTN_AUTOTUNE" not in os.environ:
        os.environ["MIXATTN_AUTOTUNE"] = "0"
        set_here.append("MIXATTN_AUTOTUNE")
    yield
    for name in set_here:
        del os.environ[name]


def make_ctx(T: int, head_dim: int, offset: int = 0, cache=None, theta: float = 10000.0, kernels=None) -> AttnContext:
    cos, sin = RotaryEmbedding(head_dim, theta)(torch.arange(offset, offset + T))
    return AttnContext(cos, sin, offset, cache, kernels=kernels)


def grads(out: torch.Tensor, tensors, seed: int = 1):
    """Gradients of a random projection of ``out`` (avoids expanded grads from .sum())."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, tensors, g, allow_unused=True)


def assert_fp_close(actual: torch.Tensor, expected: torch.Tensor, terms: int, chain: int = 4):
    """Equal up to rounding, with the tolerance derived from the dtype and the magnitudes.

    Two computations of the same value that differ only in summation order (thread count, SIMD
    width, blocking, kernel choice) differ by about ``eps * sqrt(terms)`` of the summands' size per
    reduction of ``terms`` products; ``chain`` bounds how many such reductions compound (layers,
    backward). Elements near zero carry the rounding of their large summands, so the tolerance is
    absolute, scaled by the largest expected magnitude.
    """
    eps = torch.finfo(expected.dtype).eps
    scale = max(float(expected.detach().abs().max()), torch.finfo(expected.dtype).tiny)
    tol = 4 * chain * eps * terms**0.5 * scale
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)
