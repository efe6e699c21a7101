"""Token -> expert routers returning a ``RouterOutput``.

One router serves every mixture in the package (MoE FFN, MoA attention experts, MoH heads, BAM):
they all consume ``(x, indices, weights)``. Scoring, top-k selection and gate normalisation are
named options (see ``RouterConfig``) covering the routers of: Switch/ST-MoE (arXiv 2101.03961,
2202.08906), JetMoE (softmax over the top-k logits), MoH (renorm x k), DeepSeek-V3
(sigmoid + selection-only bias, "Auxiliary-Loss-Free Load Balancing", arXiv 2408.15664) and
graph-of-tokens routing ("Improving Routing in Sparse MoE with Graph of Tokens", arXiv 2505.00792).

Legend: B batch, T tokens, N = B*T routed tokens, E experts, K top-k, d hidden dim, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dispatch import kernel

SCORINGS = ("softmax", "sigmoid", "query_norm")
SELECT_ON = ("logits", "probs")
GATE_NORMS = ("none", "renorm", "softmax_topk", "scale_k")
GATES = ("soft", "binary_ste")
GRAPHS = ("none", "similarity", "attention")


@dataclass(frozen=True)
class RouterOutput:
    """What every router returns and every balancing loss consumes.

    logits (N, E) fp32; probs (N, E) (after graph smoothing, if any); indices (N, K) int64;
    weights (N, K) gate values; mask (N, E) bool of selected experts; seq_len T (N = B*T).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor | None = None
    seq_len: int | None = None

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]

    def counts(self) -> torch.Tensor:
        """Tokens routed to each expert, counting every one of the K slots: (E,) float."""
        return torch.bincount(self.indices.flatten(), minlength=self.num_experts).float()


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    num_experts: int
    top_k: int
    scoring: str = "softmax"  # softmax | sigmoid | query_norm (parameter-free, MoH-LLaMA3: logits given)
    select_on: str = "logits"  # top-k on raw logits or on probs (differs under noise, sigmoid, graphs)
    gate_norm: str = "none"  # none (raw prob) | renorm | softmax_topk (JetMoE) | scale_k (renorm x K, MoH)
    gate: str = "soft"  # soft | binary_ste (forward 1, straight-through gradient; MoH-LLaMA3)
    noise_std: float = 0.0  # Gaussian noise on logits while training (Shazeer et al. 2017)
    graph: str = "none"  # none | similarity | attention (graph-of-tokens smoothing of probs)
    graph_temperature: float = 1.0  # temperature of the similarity graph's softmax
    bias_rate: float = 0.0  # > 0 enables the DeepSeek-V3 selection-only bias, updated at this rate

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        for name, value, valid in (
            ("scoring", self.scoring, SCORINGS),
            ("select_on", self.select_on, SELECT_ON),
            ("gate_norm", self.gate_norm, GATE_NORMS),
            ("gate", self.gate, GATES),
            ("graph", self.graph, GRAPHS),
        ):
            if value not in valid:
                raise ValueError(f"router {name}={value!r} is not one of {valid}")
        if self.noise_std < 0 or self.bias_rate < 0 or self.graph_temperature <= 0:
            raise ValueError("router noise_std and bias_rate must be >= 0 and graph_temperature > 0")


def query_norm_logits(q_NHD: torch.Tensor) -> torch.Tensor:
    """Parameter-free MoH-LLaMA3 scores: each head's query L2 norm, divided by the per-token std."""
    norms_NH = q_NHD.float().norm(dim=-1)
    return norms_NH / norms_NH.std(dim=-1, keepdim=True).clamp_min(1e-6)


def _ste_ones(w: torch.Tensor) -> torch.Tensor:
    """Forward: ones. Backward: identity to ``w`` (straight-through estimator)."""
    return w + (1.0 - w).detach()


class Router(nn.Module):
    """Linear (or parameter-free) router with top-k selection and named gate normalisation."""

    def __init__(self, hidden_dim: int, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        # JetMoE and MoA start routers at zero-like scale; a plain Linear init keeps early routing diverse.
        self.proj = None if cfg.scoring == "query_norm" else nn.Linear(hidden_dim, cfg.num_experts, bias=False)
        if cfg.bias_rate > 0:
            self.register_buffer("selection_bias", torch.zeros(cfg.num_experts))
        else:
            self.selection_bias = None

    def forward(
        self,
        x_BTd: torch.Tensor,
        logits_NE: torch.Tensor | None = None,
        graph_qk: tuple[torch.Tensor, torch.Tensor] | None = None,
        ctx=None,
    ) -> RouterOutput:
        """Route tokens.

        Args:
            x_BTd: (B, T, d) token states.
            logits_NE: (N, E) precomputed scores, required for ``query_norm`` scoring.
            graph_qk: (q (B, H, T, D), k (B, Hkv, Tk, D)) of the preceding attention, for the
                attention-aware graph.
            ctx: the layer's ``AttnContext``, for a token graph: its cache keeps past keys and
                probs when decoding, ``q_offset`` places ``x``, ``left_pad`` keeps padded tokens
                out of the graph, and ``kernels`` chooses the attention kernel. None: a whole
                unpadded sequence with the ``auto`` kernel.
        """
        cfg = self.cfg
        B, T, _ = x_BTd.shape
        if logits_NE is None:
            if self.proj is None:
                raise ValueError("query_norm routing needs precomputed logits (per-head query norms)")
            logits_NE = self.proj(x_BTd.reshape(B * T, -1))
        # router math in fp32 (JetMoE), or float64 when the model is float64
        logits_NE = logits_NE.to(torch.promote_types(logits_NE.dtype, torch.float32))
        if self.training and cfg.noise_std > 0:
            logits_NE = logits_NE + torch.randn_like(logits_NE) * cfg.noise_std
        probs_NE = torch.sigmoid(logits_NE) if cfg.scoring == "sigmoid" else torch.softmax(logits_NE, dim=-1)
        if cfg.graph != "none":
            probs_NE = self._smooth(x_BTd, probs_NE, graph_qk, ctx)

        select_NE = logits_NE if (cfg.select_on == "logits" and cfg.graph == "none") else probs_NE
        if self.selection_bias is not None:  # bias steers selection only, never the gate value
            select_NE = probs_NE + self.selection_bias
        indices_NK = select_NE.topk(cfg.top_k, dim=-1).indices
        weights_NK = self._gates(logits_NE, probs_NE, indices_NK)
        mask_NE = torch.zeros_like(probs_NE, dtype=torch.bool).scatter_(1, indices_NK, True)
        return RouterOutput(logits_NE, probs_NE, indices_NK, weights_NK, mask_NE, seq_len=T)

    def _gates(self, logits_NE, probs_NE, indices_NK) -> torch.Tensor:
        norm, k = self.cfg.gate_norm, self.cfg.top_k
        if norm == "softmax_topk":
            w_NK = torch.softmax(logits_NE.gather(1, indices_NK), dim=-1)
        else:
            w_NK = probs_NE.gather(1, indices_NK)
            if norm in ("renorm", "scale_k"):
                w_NK = w_NK / w_NK.sum(-1, keepdim=True).clamp_min(1e-9)
            if norm == "scale_k":
                w_NK = w_NK * k
        return _ste_ones(w_NK) if self.cfg.gate == "binary_ste" else w_NK

    def _smooth(self, x_BTd, probs_NE, graph_qk, ctx) -> torch.Tensor:
        """Average each token's expert probs over a causal token graph, without building it.

        The graph-weighted average G @ P is an attention call with P as the values: the similarity
        graph is softmax(x x^T / (sqrt(d) tau)); the attention graph is the preceding layer's
        attention (mean over heads). Causal, so no token sees the future.
        """
        B, T, d = x_BTd.shape
        E = probs_NE.shape[-1]
        cache, q_offset, left_pad = (ctx.cache, ctx.q_offset, ctx.left_pad) if ctx is not None else (None, 0, None)
        attention = kernel(ctx, "attention")
        p_B1TE = probs_NE.view(B, T, E).unsqueeze(1).to(x_BTd.dtype)
        if cache is not None:
            p_B1TE = cache.extend("router_probs", p_B1TE)
        if self.cfg.graph == "similarity":
            keys_B1Td = x_BTd.unsqueeze(1)
            if cache is not None:
                keys_B1Td = cache.extend("router_keys", keys_B1Td)
            queries = x_BTd.unsqueeze(1) / self.cfg.graph_temperature
            out_B1TE = attention(queries, keys_B1Td, p_B1TE, q_offset, left_pad)
            return out_B1TE.squeeze(1).reshape(B * T, E).float()
        if graph_qk is None:
            raise ValueError("attention-aware routing needs the preceding attention's (q, k)")
        q_BHTD, k_BKTD = graph_qk
        v_BKTE = p_B1TE.expand(-1, k_BKTD.shape[1], -1, -1)
        out_BHTE = attention(q_BHTD, k_BKTD, v_BKTE, q_offset, left_pad)
        return out_BHTE.mean(dim=1).reshape(B * T, E).float()

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """DeepSeek-V3 aux-loss-free rule: b_i += rate * sign(mean load - load_i), once per step."""
        if self.selection_bias is None:
            raise ValueError("update_bias needs a router built with bias_rate > 0")
        counts_E = counts_E.to(self.selection_bias)
        self.selection_bias += self.cfg.bias_rate * torch.sign(counts_E.mean() - counts_E)
