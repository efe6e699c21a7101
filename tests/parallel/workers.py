"""Functions run on each rank by ``mixattn.parallel.spawn`` (module level, so spawned processes can import them)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mixattn.layers.losses import BalanceBuffer
from mixattn.models import PRESETS, MixtureLM
from mixattn.parallel import Distributed, make_mesh, parallelize
from mixattn.train.data import load_corpus
from mixattn.train.loop import train

# MoA attention experts and MoE FFN experts (4 each, top-2), global-batch balance, DeepSeek-V3 bias on the FFN router
CFG = PRESETS["tiny-moa-moe"].evolve(balance="global")
CFG_BIAS = CFG.evolve(moe=replace(CFG.moe, router=replace(CFG.moe.router, bias_rate=1e-3)))


def batch(B: int = 4, T: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (B, T), generator=g), torch.randint(0, CFG.vocab_size, (B, T), generator=g)


def sharded_model(cfg, ep: int | None = None, seed: int = 0, precision: str = "fp32"):
    torch.manual_seed(seed)  # every rank builds the same full model, then keeps its shards
    model = MixtureLM(cfg)
    mesh = make_mesh(ep)
    parallelize(model, mesh, precision)
    return model, mesh


def full_params(model) -> dict[str, torch.Tensor]:
    """The whole model's parameters, gathered (every rank takes part; rank 0 gets them)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def forward_backward(session, ep: int | None):
    """Two micro-batches with one balance buffer, as gradient accumulation runs them; returns this
    rank's logits and losses, and (rank 0) the full gradients after FSDP's reduction."""
    model, mesh = sharded_model(CFG, ep)
    world = Distributed(mesh)
    buffer = BalanceBuffer()
    out = {"logits": [], "ce": [], "aux": []}
    for micro in range(2):
        x, y = (world.local_rows(t) for t in batch(seed=1 + micro))
        o = model(x, balance_buffer=buffer)
        ce = F.cross_entropy(o.logits.flatten(0, 1), y.flatten())
        ((ce + o.aux_loss) / 2).backward()
        out["logits"].append(o.logits.detach())
        out["ce"].append(world.mean(float(ce.detach())))
        out["aux"].append(world.mean(float(o.aux_loss.detach())))
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # collective on every rank
    out["grads"] = grads if session.is_main else None
    out["mesh"] = (mesh.dp_size, mesh.ep_size)
    bf16, _ = sharded_model(CFG, ep, precision="bf16")  # FSDP2 mixed precision: bf16 compute, fp32 weights
    out["bf16_logits"] = bf16(world.local_rows(batch(seed=1)[0])).logits.detach()
    out["bf16_weight_dtype"] = bf16.layers[0].attn_norm.weight.dtype  # a block reshards after forward: its fp32 shard
    out["errors"] = _bad_input_errors(world)
    return out


def _bad_input_errors(world) -> list[str]:
    """Messages of the errors the package raises for an ep size that does not fit."""
    messages = []
    try:
        make_mesh(ep=3)
    except ValueError as e:
        messages.append(str(e))
    try:
        world.local_rows(torch.zeros(world.world_size + 1, 2))
    except ValueError as e:
        messages.append(str(e))
    odd = CFG.evolve(moe=replace(CFG.moe, router=replace(CFG.moe.router, num_experts=3, top_k=1)))
    try:
        sharded_model(odd)
    except ValueError as e:
        messages.append(str(e))
    return messages


def train_run(session, corpus: str, tcfg, out: str, stop_at: int | None = None, resume: bool = False,
              ep: int | None = None):  # fmt: skip
    """The training loop over a sharded model; rank 0 returns the full parameters at the end."""
    model, mesh = sharded_model(CFG_BIAS, ep, seed=tcfg.seed)
    data = load_corpus(corpus)
    train(model, data, tcfg, out, stop_at=stop_at, resume=resume, progress=False, world=Distributed(mesh))
    params = full_params(model)
    return params if session.is_main else None


def train_twice(session, corpus: str, tcfg, whole: str, split: str, stop_at: int):
    """An uninterrupted run, and a run stopped (and saved) at ``stop_at``."""
    params = train_run(session, corpus, tcfg, whole)
    train_run(session, corpus, tcfg, split, stop_at=stop_at)
    return params


def fail_on_rank_1(session):
    """Rank 1 gets an out-of-vocabulary token and raises in its forward, while rank 0 waits in the
    expert all-to-all; rank 0 must end with an error naming rank 1's."""
    model, mesh = sharded_model(CFG)
    x, _ = (Distributed(mesh).local_rows(t) for t in batch())
    if session.rank == 1:
        x = x.clone()
        x[0, 0] = CFG.vocab_size + 7
    model(x)
    dist.barrier()


def hang_on_rank_1(session):
    """Rank 1 never reaches the collective rank 0 waits in (a deadlock, a stuck data loader)."""
    import time

    if session.rank == 1:
        time.sleep(600)
    dist.all_reduce(torch.ones(1))
