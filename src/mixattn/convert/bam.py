"""BAM upcycling ("Branch-Attend-Mix", arXiv 2408.08274) and the Branch-Train-Mix workflow.

From N dense models of one architecture: each model's attention becomes one soft attention expert
(full Q/K/V/O, or own Q/O with K/V averaged), each FFN one expert of a top-1 MoE, and everything
else (embeddings, norms, head) is averaged; routers start random. ``attention="averaged"`` gives
the BTX baseline (Sukhbaatar et al. 2024): attention averaged too, only the FFNs become experts.

One deliberate difference from the paper: the FFN gate is binary with a straight-through gradient
(forward weight 1, backward the router probability) instead of the raw top-1 probability, so the
upcycled model starts from its parents' function (N identical parents reproduce the parent exactly)
instead of scaling every FFN output by about 1/N, while the router still learns.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..layers.moe import MoEConfig
from ..layers.routers import RouterConfig
from ..models.decoder import MixtureLM
from .common import require_dense

ATTENTION = {"experts": "bam", "shared_kv": "bam_kv", "averaged": "dense"}  # averaged = the BTX baseline


def _stack(modules, name: str) -> torch.Tensor:
    """The ``name`` Linear weights of each parent module, stacked: (N, out, in)."""
    return torch.stack([getattr(m, name).weight for m in modules])


def _check_same_architecture(models: list[MixtureLM]) -> None:
    base = models[0].cfg.to_dict()
    for n, m in enumerate(models[1:], start=1):
        other = m.cfg.to_dict()
        diff = [k for k in base if base[k] != other[k]]
        if diff:
            raise ValueError(f"BAM needs models of one architecture: model {n} differs in {diff[0]} "
                             f"({other[diff[0]]!r} vs {base[diff[0]]!r})")  # fmt: skip


def upcycle_bam(
    models: list[MixtureLM], attention: str = "experts", block: str = "sequential", ffn_gate: str = "ste"
) -> MixtureLM:
    """Mix ``models`` into one BAM model.

    Args:
        attention: "experts" (full Q/K/V/O experts, one KV cache each), "shared_kv" (own Q/O, K/V
            averaged), or "averaged" (one dense attention averaged from all: Branch-Train-MiX, BTX).
        block: "sequential" keeps the parents' function; "parallel" is BAM's GPT-J block (needs training).
        ffn_gate: "ste" (see module docstring) or "raw" (the paper's raw top-1 probability).
    """
    if not models:
        raise ValueError("BAM needs at least one model")
    if attention not in ATTENTION or ffn_gate not in ("ste", "raw") or block not in ("sequential", "parallel"):
        raise ValueError(f"attention must be one of {list(ATTENTION)}, ffn_gate ste/raw, block sequential/parallel")
    _check_same_architecture(models)
    cfg = models[0].cfg
    require_dense(cfg, "BAM upcycling", ffn=True)
    N = len(models)
    router = RouterConfig(num_experts=N, top_k=1, gate="binary_ste" if ffn_gate == "ste" else "soft")
    new_cfg = cfg.evolve(attention=ATTENTION[attention], bam_experts=N, ffn="moe", block=block,
                                  moe=MoEConfig(router=router))  # fmt: skip
    new = MixtureLM(new_cfg)
    states = [m.state_dict() for m in models]
    want = new.state_dict()
    expert_parts = (".ffn.",) if attention == "averaged" else (".attn.", ".ffn.")
    averaged = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]
                if k in want and not any(p in k for p in expert_parts)}  # fmt: skip
    new.load_state_dict(averaged, strict=False)
    with torch.no_grad():
        for i, layer in enumerate(new.layers):
            attns = [m.layers[i].attn for m in models]
            ffns = [m.layers[i].ffn for m in models]
            if attention != "averaged":
                layer.attn.q_proj.copy_(_stack(attns, "q_proj"))
                layer.attn.o_proj.copy_(_stack(attns, "o_proj"))
            if attention == "experts":
                layer.attn.k_proj.copy_(_stack(attns, "k_proj"))
                layer.attn.v_proj.copy_(_stack(attns, "v_proj"))
            elif attention == "shared_kv":  # shared K/V: a non-expert parameter, so averaged like the rest
                layer.attn.k_proj.weight.copy_(_stack(attns, "k_proj").mean(0))
                layer.attn.v_proj.weight.copy_(_stack(attns, "v_proj").mean(0))
            gate_up = torch.cat([_stack(ffns, "gate_proj"), _stack(ffns, "up_proj")], dim=1)  # (N, 2f, d)
            layer.ffn.input_linear.weight.copy_(gate_up)
            layer.ffn.output_linear.weight.copy_(_stack(ffns, "down_proj"))
    return new


def branch(model: MixtureLM, corpora: list[str], train_cfg, out_dir: str | Path, tokenizer=None, progress=True):
    """Branch-Train-Mix, phase 1-2: fine-tune one copy of ``model`` per corpus.

    Returns the list of fine-tuned models; each run (checkpoint, metrics) lives in out_dir/branch-<i>.
    """
    from ..data import load_corpus
    from ..train.loop import train

    out = []
    for i, corpus in enumerate(corpora):
        data = load_corpus(corpus, tokenizer=tokenizer)
        child = copy.deepcopy(model)
        train(child, data, train_cfg, Path(out_dir) / f"branch-{i}", progress=progress, tokenizer=tokenizer)
        out.append(child)
    return out
