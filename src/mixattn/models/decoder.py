"""``MixtureLM``: a Llama-style decoder (RMSNorm, RoPE, SwiGLU, optional tied embeddings) whose
layers each take the attention and FFN named by ``MixtureConfig``.

Legend: B batch, T tokens, V vocab, d hidden dim, L layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..layers.attention import Attention, AttnContext, RotaryEmbedding
from ..layers.bam import BAMAttention, BAMSharedKVAttention
from ..layers.cache import KVCache, check_left_pad
from ..layers.losses import BalanceBuffer, aux_loss
from ..layers.moa import MoAAttention
from ..layers.moe import MoE
from ..layers.moh import MoHAttention
from ..layers.norm import RMSNorm, SwiGLU
from ..layers.rcmha import RCMHAttention
from ..layers.routers import RouterOutput
from .config import MixtureConfig


@dataclass
class ModelOutput:
    """logits (B, T, V); aux_loss scalar (balance + z, with the config's coefficients); stats:
    per-layer expert load and active-head fraction; routers: (name, RouterOutput) per routed layer."""

    logits: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict = field(default_factory=dict)
    routers: list[tuple[str, RouterOutput]] = field(default_factory=list)


def build_attention(cfg: MixtureConfig, kind: str) -> nn.Module:
    acfg = cfg.attention_config()
    if kind == "dense":
        return Attention(acfg)
    if kind == "moh":
        return MoHAttention(acfg, cfg.moh)
    if kind == "moa":
        return MoAAttention(acfg, cfg.moa)
    if kind == "bam":
        return BAMAttention(acfg, cfg.bam_experts)
    if kind == "rcmha":
        return RCMHAttention(acfg, cfg.rcmha)
    return BAMSharedKVAttention(acfg, cfg.bam_experts)


class Block(nn.Module):
    """Pre-norm residual block, sequential (Llama) or parallel (GPT-J / BAM)."""

    def __init__(self, cfg: MixtureConfig, layer: int):
        super().__init__()
        self.parallel = cfg.block == "parallel"
        self.attn_norm = RMSNorm(cfg.hidden_dim, cfg.norm_eps)
        self.attn = build_attention(cfg, cfg.attention_at(layer))
        self.ffn_norm = None if self.parallel else RMSNorm(cfg.hidden_dim, cfg.norm_eps)
        self.ffn = MoE(cfg.hidden_dim, cfg.ffn_dim, cfg.moe) if cfg.ffn_at(layer) == "moe" else SwiGLU(
            cfg.hidden_dim, cfg.ffn_dim
        )

    def _ffn(self, h: torch.Tensor, ctx: AttnContext, graph_qk):
        if isinstance(self.ffn, MoE):
            out = self.ffn(h, ctx, graph_qk)
            return out.y, out.router
        return self.ffn(h), None

    def forward(self, x: torch.Tensor, ctx: AttnContext):
        h = self.attn_norm(x)
        a = self.attn(h, ctx)
        if self.parallel:
            f, fr = self._ffn(h, ctx, a.graph_qk)
            return x + a.y + f, a.router, fr
        x = x + a.y
        f, fr = self._ffn(self.ffn_norm(x), ctx, a.graph_qk)
        return x + f, a.router, fr


class MixtureLM(nn.Module):
    """Decoder LM. forward(input_ids (B, T)) -> ModelOutput with logits (B, T, V)."""

    def __init__(self, cfg: MixtureConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_dim)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_dim, cfg.norm_eps if cfg.final_norm_eps is None else cfg.final_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def router(self, name: str):
        """The ``Router`` behind a routed layer name from ``ModelOutput.routers`` ("layers.3.ffn")."""
        return self.get_submodule(name).router

    def new_cache(self, ref_len: int | None = None) -> list:
        """One cache per layer: a ragged per-head cache where a sparse plan is applied (sized for the
        reference length ``ref_len`` = prompt + max_new_tokens), else a dense ``KVCache``."""
        caches = []
        for layer in self.layers:
            spec = getattr(layer.attn, "sparse", None)
            if isinstance(layer.attn, RCMHAttention):  # dense K/V plus the convolution's state
                caches.append(layer.attn.new_cache(ref_len or 0))
                continue
            # sized once for N: growing by doubling would over-allocate up to 2x at the first decode step
            caches.append(spec.new_cache(ref_len) if spec is not None and ref_len else KVCache(ref_len or 0))
        return caches

    def kv_cache_bytes(self, cache: list) -> int:
        return sum(c.nbytes() for c in cache)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: list[KVCache] | None = None,
        start_pos: int = 0,
        balance_buffer: BalanceBuffer | None = None,
        ref_len: int | None = None,
        left_pad: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Args:
        input_ids: (B, T) token ids at positions ``start_pos .. start_pos+T-1``.
        cache: from ``new_cache()``, for incremental decoding (filled in place).
        balance_buffer: count buffer for ``balance="global"`` (owned by the training loop).
        ref_len: reference length N for sparse plans (default: start_pos + T).
        left_pad: (B,) number of padding tokens at the start of each row, for batches of prompts of
            unequal length; pass the same tensor at every decoding step. Padded tokens are never
            attended to and sparse sinks start at each row's first real token; RoPE is relative,
            so a row's outputs match the unpadded prompt's. Logits at padded positions are meaningless.
        logits_to_keep: 0 (default) computes logits (B, T, V) for every position, as a loss needs;
            n > 0 only for the last n positions, (B, n, V). Generation needs only the last one: at
            8k tokens the full fp32 logits are 8k x 49152 x 4 B = 1.6 GB and a fifth of the FLOPs.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be (batch, tokens) integers, got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        if input_ids.numel() and int(input_ids.max()) >= self.cfg.vocab_size:
            raise ValueError(f"token id {int(input_ids.max())} >= vocab_size {self.cfg.vocab_size}")
        B, T = input_ids.shape
        left_pad = check_left_pad(left_pad, B, start_pos + T)  # None when no row is padded: unpadded paths
        if left_pad is not None:
            left_pad = left_pad.to(input_ids.device)
        cos, sin = self.rope(torch.arange(start_pos, start_pos + T, device=input_ids.device))
        x = self.embed(input_ids)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once per forward, not per layer (a decode step is many small ops)
        routers: list[tuple[str, RouterOutput]] = []
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            ctx = AttnContext(cos, sin, start_pos, layer_cache, ref_len, left_pad, self.cfg.kernels)
            x, ar, fr = layer(x, ctx)
            routers += [(f"layers.{i}.{part}", r) for part, r in (("attn", ar), ("ffn", fr)) if r is not None]
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.norm(x))
        cfg = self.cfg
        aux = aux_loss(routers, cfg.balance, cfg.balance_coef, cfg.z_coef, balance_buffer).to(logits.device)
        return ModelOutput(logits, aux, self._stats(routers), routers)

    def _stats(self, routers) -> dict:
        stats: dict = {}
        fractions = []
        for name, r in routers:
            counts = r.counts().detach()
            stats[f"{name}.load"] = counts / counts.sum().clamp_min(1)
            layer = self.layers[int(name.split(".")[1])]
            if name.endswith(".attn") and isinstance(layer.attn, MoHAttention):
                fractions.append(layer.attn.moh.active_fraction(self.cfg.num_heads))
        if fractions:
            stats["active_head_fraction"] = sum(fractions) / len(fractions)
        return stats

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        stop_tokens: tuple[int, ...] = (),
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        left_pad: torch.Tensor | None = None,
        prefill_chunk: int | None = None,
    ) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation. input_ids (B, T) -> (B, T + n), n <= max_new_tokens;
        stops early once every row has produced a stop token (rows that stopped are padded with it).
        Prompts of unequal length: left-pad them (``pad_left``) and pass ``left_pad`` (B,).
        ``prefill_chunk``: run the prompt through the model this many tokens at a time (long prompts:
        activations scale with the chunk, not the prompt); the tokens are the same up to rounding.
        Not with ``left_pad`` under a sparse plan, nor with ``use_cache=False``."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        was_training = self.training
        self.eval()
        N = input_ids.shape[1] + max_new_tokens  # sparse plans size spans (and caches) once, for N
        cache = self.new_cache(N) if use_cache else None
        seq, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = self._prefill(seq, cache, N, left_pad, prefill_chunk if use_cache else None)
        for _ in range(max_new_tokens):
            nxt = _sample(logits, temperature, top_k, generator)
            if stop_tokens:
                nxt = torch.where(done, torch.full_like(nxt, stop_tokens[0]), nxt)
                done |= torch.isin(nxt, torch.tensor(stop_tokens, device=nxt.device))
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if stop_tokens and bool(done.all()):
                break
            if use_cache:
                logits = self(nxt[:, None], cache, start_pos=seq.shape[1] - 1, ref_len=N, left_pad=left_pad).logits[:, -1]
            else:
                logits = self(seq, ref_len=N, left_pad=left_pad, logits_to_keep=1).logits[:, -1]
        self.train(was_training)
        return seq

    def _prefill(self, ids, cache, N: int, left_pad, chunk: int | None) -> torch.Tensor:
        """Logits (B, V) of the prompt's last position, filling ``cache``; in chunks of ``chunk`` tokens."""
        T = ids.shape[1]
        if not chunk or chunk >= T:
            return self(ids, cache, ref_len=N, left_pad=left_pad, logits_to_keep=1).logits[:, -1]
        if chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {chunk}")
        for a in range(0, T, chunk):
            out = self(ids[:, a : a + chunk], cache, start_pos=a, ref_len=N, left_pad=left_pad, logits_to_keep=1)
        return out.logits[:, -1]


def pad_left(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of unequal length -> (input_ids (B, T_max) padded on the left, left_pad (B,))."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("pad_left needs at least one prompt and no empty prompt")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.as_tensor(p, dtype=torch.long)
    return ids, torch.tensor([T - len(p) for p in prompts])


def _sample(logits_BV: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1])).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits_BV, -1), 1, generator=generator).squeeze(1)


def count_parameters(model: MixtureLM) -> tuple[int, int]:
    """(total, active per token). Routed experts count K/E of their weights; MoH counts the active
    fraction of its q/o projections (K/V are computed for every head); BAM is soft, so all active."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for layer in model.layers:
        for mod in (layer.attn, layer.ffn):
            if isinstance(mod, (MoE, MoAAttention)):
                E, K = mod.router.cfg.num_experts, mod.router.cfg.top_k
                expert = mod.input_linear.weight.numel() + mod.output_linear.weight.numel()
                inactive += expert * (1 - K / E)
            elif isinstance(mod, MoHAttention):
                frac = mod.moh.active_fraction(mod.cfg.num_heads)
                inactive += (mod.q_proj.weight.numel() + mod.o_proj.weight.numel()) * (1 - frac)
    return total, int(total - inactive)
