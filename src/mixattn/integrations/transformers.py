"""mixattn plans on plain transformers models (Llama, Qwen2, Mistral; GQA included), in place and
reversibly, through transformers' own extension points: no forked modeling file, no monkeypatching.

- ``apply_plan(model, plan)`` gives every attention module its layer's rules (a ``SparseSpec``) and
  switches the model to the attention function ``"mixattn"``, registered in transformers'
  ``AttentionInterface`` (and a key-padding mask function in ``AttentionMaskInterface``). The
  function is mixattn's own ``layers.dispatch.attend``: compiled FlexAttention at inference where a
  one-time probe (``flex_works``) finds it runs and agrees with the reference, exact masked SDPA
  (``reference``) otherwise and for short sequences, ``blocked`` when gradients are needed (``impl``
  picks one). ``remove_plan(model)`` restores the previous attention.
- ``SparseCache(model, max_new_tokens=n)`` is a ``transformers.Cache`` whose layers hold mixattn's
  ragged per-KV-head cache (sink + circular window): ``model.generate(ids, max_new_tokens=n,
  past_key_values=SparseCache(model, max_new_tokens=n))`` allocates about density x the dense KV bytes.

Rules follow the plan semantics (MoA, arXiv 2406.14909; sinks as StreamingLLM, arXiv 2309.17453):
query i sees key j when j <= i and (j < sink or i - j < span(N)). N is the reference length: with a
``SparseCache`` it is prompt + max_new_tokens (as ``MixtureLM.generate``); otherwise the number of
keys (a plain forward, or generation with transformers' dense cache, where N grows each step).
Left padding (from ``attention_mask``) is supported as in ``MixtureLM``: sinks start at each row's
first real token.

Legend: B batch, H query heads, Hkv KV heads, T new tokens, Tk keys, D head dim, N reference length.
"""

from __future__ import annotations

import dataclasses
import warnings
from types import SimpleNamespace

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from .. import kernels
from ..compress.plan import Plan
from ..kernels.sparse import FLEX_MIN_LEN
from ..layers.attention import AttnContext
from ..layers.cache import RaggedKVCache
from ..layers.dispatch import attend
from ..layers.sparse import SparseSpec

NAME = "mixattn"  # the attention implementation name registered with transformers
SUPPORTED = ("llama", "mistral", "qwen2")  # config.model_type
_SPEC = "mixattn_spec"  # set on each attention module by apply_plan
_PREVIOUS = "mixattn_previous_attn_implementation"  # set on the model by apply_plan


def _attention_modules(model) -> list:
    """The self-attention module of every decoder layer, after checking the architecture is supported."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"mixattn.hf supports transformers models of type {', '.join(SUPPORTED)}; "
                         f"{type(model).__name__} has model_type {kind!r}")  # fmt: skip
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or len(layers) != cfg.num_hidden_layers:
        raise ValueError(f"{type(model).__name__}: expected {cfg.num_hidden_layers} decoder layers under .model.layers")
    mods = [getattr(layer, "self_attn", None) for layer in layers]
    if any(m is None or not hasattr(m, "layer_idx") for m in mods):
        raise ValueError(f"{type(model).__name__}: a decoder layer has no self_attn with a layer_idx")
    return mods


def has_plan(model) -> bool:
    return getattr(model, _PREVIOUS, None) is not None


def apply_plan(model, plan: Plan, impl: str = "auto"):
    """Attach ``plan`` to a transformers causal LM in place (and return it).

    Args:
        model: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM`` or their base models.
        plan: one rule per (layer, KV head); must match num_hidden_layers x num_key_value_heads.
        impl: ``sparse_attention`` kernel for prefill: "auto", "reference", "blocked" or "flex".
    Raises ValueError for another architecture, a plan of the wrong shape or an unknown ``impl``.
    """
    if impl != "auto":
        kernels.get("sparse_attention", impl)
    mods = _attention_modules(model)
    cfg = model.config
    plan.validate(SimpleNamespace(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads))
    AttentionInterface.register(NAME, sparse_attention_forward)
    AttentionMaskInterface.register(NAME, key_padding_mask)
    for mod, rules in zip(mods, plan.layers):
        sinks, alphas, betas = zip(*((r.sink, float(r.alpha), float(r.beta)) for r in rules))
        setattr(mod, _SPEC, SparseSpec(sinks, alphas, betas, impl))
    if not has_plan(model):
        setattr(model, _PREVIOUS, cfg._attn_implementation or "sdpa")
    model.set_attn_implementation(NAME)
    return model


def remove_plan(model):
    """Undo ``apply_plan``: drop the rules and restore the attention implementation it replaced."""
    for mod in _attention_modules(model):
        if hasattr(mod, _SPEC):
            delattr(mod, _SPEC)
    previous = getattr(model, _PREVIOUS, None)
    if previous is not None:
        model.set_attn_implementation(previous)
        delattr(model, _PREVIOUS)
    return model


def key_padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                     attention_mask=None, **kwargs):  # fmt: skip
    """``AttentionMaskInterface`` entry: the 2-D padding mask as (B, 1, 1, Tk) bool, or None when no
    key is padded. Causality and the plan's rules are applied in the attention function, so no
    (T, Tk) mask is ever built here."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask[:, None, None, -kv_length:].to(torch.bool)


def _left_pad(mask: torch.Tensor | None, Tk: int) -> torch.Tensor | None:
    """Left padding (B,) from a 4-D mask (B, 1, Tq, Tk) (bool, or additive float: 0 = visible), read
    on the newest query's row; None when no row is padded. Only left padding is supported."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[-1] != Tk:
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not match {Tk} keys")
    ok = mask[:, 0, -1, :]
    ok = ok if ok.dtype == torch.bool else ok == 0
    pad = (~ok).long().cumprod(-1).sum(-1)  # leading masked keys per row
    if not bool((ok.sum(-1) == Tk - pad).all()):
        raise ValueError("attention_mask: mixattn plans support left padding only (a row has a masked key "
                         "after its first real token)")  # fmt: skip
    return pad if bool(pad.any()) else None


def sparse_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, **kwargs):  # fmt: skip
    """``AttentionInterface`` entry "mixattn": query (B, H, T, D), key/value (B, Hkv, Tk, D) ->
    ((B, T, H, D), None). Keys come from a ``SparseCache`` (only the new tokens, tagged with their
    cache layer) or from any other cache / none (every key so far)."""
    spec = getattr(module, _SPEC, None)
    if spec is None:
        raise ValueError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no mixattn plan; "
                         "call mixattn.hf.apply_plan(model, plan) on its model")  # fmt: skip
    if dropout and module.training:
        raise ValueError(f"attention dropout {dropout} is not supported with a mixattn plan; set it to 0")
    D = query.shape[-1]
    if scaling is not None and abs(scaling - D**-0.5) > 1e-12:  # the kernels use SDPA's default 1/sqrt(D)
        query = query * (scaling * D**0.5)
    layer = getattr(key, "_mixattn_layer", None)
    if layer is not None:
        layer.pending = False
        cache = layer.ragged
        N, total = cache.ref_len, cache.length + key.shape[2]
        pad = _left_pad(attention_mask, total) if cache.length == 0 else None  # the cache keeps the prefill's
        ctx = AttnContext(None, None, cache.length, cache, N, pad)
    else:
        N = key.shape[2]
        ctx = AttnContext(None, None, N - query.shape[2], None, None, _left_pad(attention_mask, N))
    if sliding_window is not None and N > sliding_window:
        raise ValueError(f"layer {module.layer_idx}: the model's own sliding window ({sliding_window}) is shorter "
                         f"than the reference length {N}; set config.sliding_window = None to use a mixattn plan")  # fmt: skip
    if spec.impl == "auto" and query.shape[2] >= FLEX_MIN_LEN and not (query.requires_grad and torch.is_grad_enabled()):
        if not flex_works(query):  # "auto" would pick compiled flex for this prefill
            spec = dataclasses.replace(spec, impl="reference")
    out = attend(query, key, value, ctx, spec)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


_FLEX_WORKS: dict[tuple, bool] = {}  # (device type, dtype, head dim) -> whether compiled flex ran


def flex_works(like: torch.Tensor) -> bool:
    """Whether compiled FlexAttention runs and agrees with the reference here, probed once per
    (device, dtype, head dim) on a one-block input (the dynamic-shape compile is then reused by real
    inputs). Where it fails (no C compiler, an unsupported backend, a wrong result) the exact
    masked-SDPA reference is used instead, with a warning."""
    key = (like.device.type, like.dtype, like.shape[-1])
    if key not in _FLEX_WORKS:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, FLEX_MIN_LEN, like.shape[-1], generator=g).to(like) for _ in range(3))
        sink, span = (torch.tensor([n], device=like.device) for n in (4, 40))
        try:
            with torch.no_grad():
                got = kernels.get("sparse_attention", "flex")(q, k, v, sink, span)
                want = kernels.get("sparse_attention", "reference")(q, k, v, sink, span)
            tol = 1e-4 if like.dtype == torch.float32 else 2e-2
            if not torch.allclose(got.float(), want.float(), atol=tol, rtol=0):
                raise ValueError(f"its result differs from the reference by {float((got - want).abs().max()):.2e}")
            _FLEX_WORKS[key] = True
        except Exception as e:  # noqa: BLE001 - any compile/backend failure means: use the reference
            warnings.warn(f"mixattn: compiled FlexAttention is unavailable ({type(e).__name__}: {str(e)[:200]}); "
                          "using the masked-SDPA reference kernel (exact, O(T^2) memory)", stacklevel=2)  # fmt: skip
            _FLEX_WORKS[key] = False
    return _FLEX_WORKS[key]


class SparsePlanLayer(CacheLayerMixin):
    """One layer of a ``SparseCache``: a mixattn ``RaggedKVCache`` (each KV head: ``min(N, sink +
    span(N))`` slots) created at the first update, when N = prompt + ``max_new_tokens`` is known.

    ``update`` stores nothing itself: it returns the new key/value tagged with this layer, and the
    "mixattn" attention function writes them (it knows the prompt's left padding) and attends.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, spec: SparseSpec, max_cache_len: int | None = None, max_new_tokens: int | None = None):
        super().__init__()
        self.spec, self.max_cache_len, self.max_new_tokens = spec, max_cache_len, max_new_tokens
        self.ragged: RaggedKVCache | None = None
        self.seen = 0  # tokens passed through update (padding included)
        self.pending = False  # an update whose tokens the attention function has not written yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        N = self.max_cache_len or key_states.shape[2] + self.max_new_tokens
        self.ragged = self.spec.new_cache(N)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.pending:
            raise ValueError("SparseCache: the previous tokens were never written; the model's attention is not "
                             "'mixattn' (call mixattn.hf.apply_plan before generating with a SparseCache)")  # fmt: skip
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T = key_states.shape[2]
        if self.seen + T > self.ragged.ref_len:
            raise ValueError(f"SparseCache is sized for {self.ragged.ref_len} tokens (prompt + max_new_tokens); "
                             f"got token {self.seen + T}")  # fmt: skip
        self.seen += T
        self.pending = True
        k, v = key_states.view_as(key_states), value_states.view_as(value_states)
        k._mixattn_layer = self  # read by sparse_attention_forward, the next call to see these tensors
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.ragged.ref_len if self.ragged is not None else -1

    def reset(self) -> None:
        self.ragged, self.seen, self.pending, self.is_initialized = None, 0, False, False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("SparseCache does not support beam search; use greedy or sampled decoding")

    def nbytes(self) -> int:
        return 0 if self.ragged is None else self.ragged.nbytes()


class SparseCache(Cache):
    """A ``transformers.Cache`` that keeps only each KV head's sink and window (mixattn's plan).

    Args:
        model: a model with a plan applied (``apply_plan``); its rules are read now.
        max_new_tokens: size every layer for N = prompt length + max_new_tokens (pass the same value to
            ``generate``), or
        max_cache_len: a fixed N instead.
    """

    def __init__(self, model, max_new_tokens: int | None = None, max_cache_len: int | None = None):
        if (max_new_tokens is None) == (max_cache_len is None):
            raise ValueError("SparseCache needs exactly one of max_new_tokens and max_cache_len")
        n = max_new_tokens if max_cache_len is None else max_cache_len
        if not isinstance(n, int) or isinstance(n, bool) or n < (0 if max_cache_len is None else 1):
            raise ValueError(f"SparseCache: {'max_new_tokens' if max_cache_len is None else 'max_cache_len'} "
                             f"must be a non-negative integer, got {n!r}")  # fmt: skip
        specs = [getattr(m, _SPEC, None) for m in _attention_modules(model)]
        if not has_plan(model) or any(s is None for s in specs):
            raise ValueError("SparseCache: the model has no mixattn plan; call mixattn.hf.apply_plan(model, plan) first")
        super().__init__(layers=[SparsePlanLayer(s, max_cache_len, max_new_tokens) for s in specs])

    def nbytes(self) -> int:
        """Bytes of K/V actually allocated, over all layers."""
        return sum(layer.nbytes() for layer in self.layers)
