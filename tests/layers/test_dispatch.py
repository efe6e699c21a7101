"""The one attention seam: every attention path reaches a registered kernel, the model-level
``MixtureConfig.kernels`` setting chooses which, and each fast kernel equals its reference."""

import dataclasses
import functools
from unittest import mock

import pytest
import torch

from mixattn import kernels
from mixattn.kernels.ragged import _chunk_rows
from mixattn.layers.cache import RaggedKVCache
from mixattn.models.config import PRESETS
from mixattn.models.decoder import MixtureLM

from ..conftest import assert_fp_close, grads

CASES = [  # B, H, Hkv, Tq, Tk, Dv, q_offset, left_pad
    (2, 4, 2, 9, 9, 8, 0, None),
    (2, 4, 4, 3, 11, 8, 8, None),
    (1, 6, 2, 1, 7, 8, 6, None),
    (3, 2, 1, 5, 5, 4, 0, [0, 2, 4]),  # values narrower than keys (token-graph routers)
    (2, 4, 2, 1, 9, 8, 8, [3, 0]),
]


@pytest.mark.parametrize("impl", ["sdpa", "matmul", "auto"])
@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,Dv,off,pad", CASES)
def test_dense_attention_impls_match_the_reference_outputs_and_grads(B, H, Hkv, Tq, Tk, Dv, off, pad, impl):
    g = torch.Generator().manual_seed(B * 100 + Tq)
    q = torch.randn(B, H, Tq, 8, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, Tk, 8, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, Tk, Dv, generator=g, requires_grad=True)
    pad = None if pad is None else torch.tensor(pad)
    a = kernels.get("attention", impl)(q, k, v, off, pad)
    b = kernels.get("attention", "reference")(q, k, v, off, pad)
    assert_fp_close(a, b, terms=Tk * 8)
    for ga, gb in zip(grads(a, [q, k, v]), grads(b, [q, k, v])):
        assert_fp_close(ga, gb, terms=Tk * 8, chain=8)


@pytest.mark.parametrize("sinks,spans,T,first", [([2, 0], [5, 3], 30, 7), ([0, 4, 1], [30, 2, 9], 25, 12),
                                                  ([3, 9], [6, 4], 40, 2)])  # a chunk starting inside the sink
def test_ragged_chunk_attention_matches_the_reference_and_the_sparse_rule(sinks, spans, T, first):
    """A prompt prefilled in two chunks: the second chunk's output equals the sparse reference."""
    Hkv, G, D = len(sinks), 2, 8
    g = torch.Generator().manual_seed(T)
    q = torch.randn(1, Hkv * G, T, D, generator=g)
    k, v = torch.randn(1, Hkv, T, D, generator=g), torch.randn(1, Hkv, T, D, generator=g)
    sink, span = torch.tensor(sinks), torch.tensor(spans)
    want = kernels.get("sparse_attention", "reference")(q, k, v, sink, span)[:, :, first:]
    blocks = functools.partial(_chunk_rows, rows=4)  # the sdpa impl's query blocks, several per chunk
    for impl in (kernels.get("ragged_chunk_attention", "sdpa"), kernels.get("ragged_chunk_attention", "reference"), blocks):
        cache = RaggedKVCache(sink, span, T)
        cache.write(k[:, :, :first], v[:, :, :first])
        out = impl(q[:, :, first:], k[:, :, first:], v[:, :, first:], cache.kept(), cache.sink, cache.span, cache.length)
        assert_fp_close(out, want, terms=T * D)


def _graph_routed(kind: str):
    """tiny-moe whose router smooths its probs over a token graph (a dense attention call per layer)."""
    cfg = PRESETS["tiny-moe"]
    return cfg.evolve(moe=dataclasses.replace(cfg.moe, router=dataclasses.replace(cfg.moe.router, graph=kind)))


SPIED = [  # (config, op, calls per layer at least)
    *[(PRESETS[p], "attention", 1) for p in ("tiny", "tiny-moh", "tiny-bam", "tiny-moa")],
    (_graph_routed("similarity"), "attention", 2),  # the layer's attention and its router's graph
    (_graph_routed("attention"), "attention", 2),
    (PRESETS["tiny-moe"], "grouped_linear", 2),  # the MoE's two expert projections
    (PRESETS["tiny-moa-moe"], "grouped_linear", 4),  # and MoA's
]


@pytest.mark.parametrize("cfg,op,per_layer", SPIED, ids=[f"{op}-{i}" for i, (_, op, _) in enumerate(SPIED)])
def test_the_model_level_kernel_setting_reaches_every_call(cfg, op, per_layer):
    """With kernels={op: "spy"}, every call of ``op`` in the model goes through the spy (a
    registered implementation for the test only, that counts and runs the reference), and the
    logits do not change."""
    calls = []

    def spy(*args, **kw):
        calls.append(1)
        return kernels.get(op, "reference")(*args, **kw)

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = MixtureLM(cfg).eval()
    with torch.no_grad():
        want = model(ids).logits
    with mock.patch.dict(kernels._REGISTRY[op], {"spy": spy}):
        spied = MixtureLM(cfg.evolve(kernels={op: "spy"})).eval()
        spied.load_state_dict(model.state_dict())
        with torch.no_grad():
            got = spied(ids).logits
    assert len(calls) >= per_layer * model.cfg.num_layers
    assert_fp_close(got, want, terms=model.cfg.hidden_dim, chain=4 * model.cfg.num_layers)


def test_an_unknown_kernel_in_the_config_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown kernel op 'atention'"):
        PRESETS["tiny"].evolve(kernels={"atention": "sdpa"})
    with pytest.raises(ValueError, match="unknown implementation 'fast' for 'attention'"):
        PRESETS["tiny"].evolve(kernels={"attention": "fast"})
