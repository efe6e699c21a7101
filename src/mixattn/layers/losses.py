"""Load-balancing losses and routing statistics: pure functions of ``RouterOutput``.

Nothing here keeps state in a module or a global: losses are returned to the caller, and the one
stateful helper (the gradient-accumulation count buffer for global-batch balance) is an explicit
object owned by the training loop.

- switch balance (Switch Transformer, JetMoE): E * sum_i f_i P_i with f_i = count_i / (N K), so the
  value is exactly 1 at uniform routing;
- z-loss (ST-MoE): mean_t logsumexp(logits_t)^2;
- global-batch balance ("Demons in the Detail", arXiv 2501.11873): f from counts all-reduced over
  data-parallel ranks and buffered over accumulation micro-steps; P stays local (it carries grads);
- sequence-wise balance (DeepSeek-V3): the switch loss per sequence, averaged;
- MaxVio (arXiv 2408.15664): (max load - mean load) / mean load;
- routing fluctuation (StableMoE): share of tokens whose top-1 expert changed between two states.

Legend: N routed tokens, E experts, K top-k, S sequences, T tokens per sequence.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .routers import RouterOutput


def _mean_probs(r: RouterOutput) -> torch.Tensor:
    """P_i: mean router probability per expert, rows normalised (sigmoid scores do not sum to 1)."""
    p_NE = r.probs / r.probs.sum(-1, keepdim=True).clamp_min(1e-9)
    return p_NE.mean(0)


def switch_loss(r: RouterOutput) -> torch.Tensor:
    """E * sum_i f_i P_i, f_i = count_i / (N K). Exactly 1 when routing is uniform."""
    N = r.indices.shape[0]
    f_E = r.counts() / (N * r.top_k)
    return r.num_experts * (f_E * _mean_probs(r)).sum()


def z_loss(r: RouterOutput) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(r.logits.float(), dim=-1).square().mean()


def sequence_balance_loss(r: RouterOutput) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance: the switch loss computed inside each sequence, averaged."""
    if r.seq_len is None:
        raise ValueError("sequence_balance_loss needs RouterOutput.seq_len")
    E, K, T = r.num_experts, r.top_k, r.seq_len
    one_hot_STE = r.mask.view(-1, T, E).float()
    f_SE = one_hot_STE.sum(1) / (T * K)
    p_NE = r.probs / r.probs.sum(-1, keepdim=True).clamp_min(1e-9)
    P_SE = p_NE.view(-1, T, E).mean(1)
    return E * (f_SE * P_SE).sum(-1).mean()


def synced_counts(r: RouterOutput) -> torch.Tensor:
    """Per-expert counts (E,), summed over all ranks when torch.distributed is initialised."""
    counts_E = r.counts().detach()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts_E)
    return counts_E


def global_balance_loss(r: RouterOutput, buffered_counts_E: torch.Tensor) -> torch.Tensor:
    """Global-batch balance: E * sum_i f_i P_i, f from counts buffered over ranks and micro-steps.

    Args:
        r: this micro-batch's routing (its probs carry the gradient).
        buffered_counts_E: (E,) counts of every token routed so far this optimizer step, on every rank.
    """
    f_E = buffered_counts_E / buffered_counts_E.sum().clamp_min(1.0)  # sums to 1 (counts include K slots)
    return r.num_experts * (f_E.to(r.probs) * _mean_probs(r)).sum()


class BalanceBuffer:
    """Count buffer for global-batch balance across gradient-accumulation steps (Algorithm 1).

    ``loss(name, r)`` adds this micro-batch's synchronised counts to the buffer of router ``name``
    and returns the global loss; call ``reset()`` after each optimizer step.
    """

    def __init__(self):
        self.counts: dict[str, torch.Tensor] = {}

    def loss(self, name: str, r: RouterOutput) -> torch.Tensor:
        c = synced_counts(r)
        self.counts[name] = self.counts[name] + c if name in self.counts else c
        return global_balance_loss(r, self.counts[name])

    def reset(self) -> None:
        self.counts.clear()


def max_vio(counts_E: torch.Tensor) -> float:
    """MaxVio load imbalance: (max load - mean load) / mean load; 0 is perfectly balanced."""
    counts_E = counts_E.float()
    mean = counts_E.mean().clamp_min(1e-9)
    return float((counts_E.max() - mean) / mean)


def routing_fluctuation(top1_before: torch.Tensor, top1_after: torch.Tensor) -> float:
    """Share of tokens whose top-1 expert differs between two router states on the same batch."""
    if top1_before.shape != top1_after.shape:
        raise ValueError(f"top-1 shapes differ: {tuple(top1_before.shape)} vs {tuple(top1_after.shape)}")
    return float((top1_before != top1_after).float().mean())


def aux_loss(
    routers: list[tuple[str, RouterOutput]],
    balance: str = "switch",
    balance_coef: float = 0.01,
    z_coef: float = 0.001,
    buffer: BalanceBuffer | None = None,
) -> torch.Tensor:
    """Sum over routers of balance_coef * balance + z_coef * z-loss (JetMoE sums over layers).

    ``balance``: switch | sequence | global (counts from ``buffer`` when given) | none. Returns a scalar.
    """
    if not routers:
        return torch.zeros(())
    total = torch.zeros((), device=routers[0][1].logits.device)
    for name, r in routers:
        if balance == "switch":
            total = total + balance_coef * switch_loss(r)
        elif balance == "sequence":
            total = total + balance_coef * sequence_balance_loss(r)
        elif balance == "global":  # without a buffer (eval, generate): this batch's counts, all ranks
            loss = buffer.loss(name, r) if buffer is not None else global_balance_loss(r, synced_counts(r))
            total = total + balance_coef * loss
        elif balance != "none":
            raise ValueError(f"balance={balance!r} is not one of switch, sequence, global, none")
        if z_coef:
            total = total + z_coef * z_loss(r)
    return total
