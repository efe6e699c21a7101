import os

import pytest
import torch
import torch.multiprocessing as mp

from mixattn.layers.losses import (
    BalanceBuffer,
    global_balance_loss,
    max_vio,
    routing_fluctuation,
    sequence_balance_loss,
    switch_loss,
    z_loss,
)
from mixattn.layers.routers import RouterOutput


def _uniform(N=8, E=4, K=2):
    idx = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], 1)[:, :K]
    logits = torch.zeros(N, E)
    mask = torch.zeros(N, E, dtype=torch.bool).scatter(1, idx, True)
    return RouterOutput(logits, torch.softmax(logits, -1), idx, torch.full((N, K), 1 / K), mask, seq_len=N)


def test_switch_loss_is_one_at_uniform_routing():
    torch.testing.assert_close(switch_loss(_uniform()), torch.tensor(1.0))


def test_switch_loss_is_larger_when_collapsed():
    r = _uniform()
    logits = torch.zeros(8, 4)
    logits[:, 0] = 5
    idx = torch.zeros(8, 1, dtype=torch.long)
    collapsed = RouterOutput(logits, torch.softmax(logits, -1), idx, torch.ones(8, 1))
    assert switch_loss(collapsed) > switch_loss(r) + 1


def test_z_loss_hand_checked_2x2():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    r = RouterOutput(logits, logits.softmax(-1), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    lse0, lse1 = torch.log(torch.tensor(2.0)), 2 + torch.log1p(torch.exp(torch.tensor(-1.0)))
    torch.testing.assert_close(z_loss(r), (lse0**2 + lse1**2) / 2)


def test_sequence_balance_equals_switch_for_one_sequence_and_differs_across_sequences():
    r = _uniform()
    torch.testing.assert_close(sequence_balance_loss(r), switch_loss(r))
    # two sequences each routed to one expert: globally balanced, per sequence collapsed
    idx = torch.tensor([[0]] * 4 + [[1]] * 4)
    logits = torch.zeros(8, 2)
    mask = torch.zeros(8, 2, dtype=torch.bool).scatter(1, idx, True)
    r2 = RouterOutput(logits, logits.softmax(-1), idx, torch.ones(8, 1), mask, seq_len=4)
    torch.testing.assert_close(switch_loss(r2), torch.tensor(1.0))
    torch.testing.assert_close(sequence_balance_loss(r2), torch.tensor(1.0))
    assert max_vio(mask[:4].sum(0)) == 1.0


def test_balance_buffer_accumulates_and_equals_full_batch():
    r = _uniform(N=16)
    halves = [
        RouterOutput(r.logits[s], r.probs[s], r.indices[s], r.weights[s], r.mask[s])
        for s in (slice(0, 8), slice(8, 16))
    ]
    buf = BalanceBuffer()
    buf.loss("l0", halves[0])
    buf.loss("l0", halves[1])
    torch.testing.assert_close(buf.counts["l0"], r.counts())
    buf.reset()
    assert buf.counts == {}


def test_max_vio_and_fluctuation():
    assert max_vio(torch.tensor([2.0, 2.0, 2.0])) == 0.0
    assert max_vio(torch.tensor([4.0, 2.0, 0.0])) == 1.0
    assert routing_fluctuation(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    with pytest.raises(ValueError, match="shapes"):
        routing_fluctuation(torch.zeros(3), torch.zeros(4))


def _worker(rank, world, port, logits, idx, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s = slice(rank * 6, rank * 6 + 6)
    lg = logits[s].clone().requires_grad_(True)
    mask = torch.zeros(6, logits.shape[1], dtype=torch.bool).scatter(1, idx[s], True)
    r = RouterOutput(lg, lg.softmax(-1), idx[s], torch.ones(6, idx.shape[1]), mask)
    loss = BalanceBuffer().loss("l", r)
    (g,) = torch.autograd.grad(loss, lg)
    out[rank] = torch.cat([loss.detach().view(1), g.flatten()])
    dist.destroy_process_group()


def test_global_balance_two_process_gloo_matches_single_process():
    """Global counts over 2 ranks: each rank's loss (local P) averages to the 1-process loss on the
    whole batch, and the gradient of the summed loss w.r.t. each rank's logits matches too."""
    E, K = 4, 2
    logits = torch.randn(12, E)
    idx = logits.topk(K).indices
    out = torch.zeros(2, 1 + 6 * E).share_memory_()
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, logits, idx, out), nprocs=2, join=True)

    full = logits.clone().requires_grad_(True)
    mask = torch.zeros(12, E, dtype=torch.bool).scatter(1, idx, True)
    r = RouterOutput(full, full.softmax(-1), idx, torch.ones(12, K), mask)
    loss = global_balance_loss(r, r.counts())
    (g,) = torch.autograd.grad(loss, full)
    torch.testing.assert_close(out[:, 0].mean(), loss.detach())
    # rank losses average to the global loss, so each rank's grad is 2x the full-batch grad slice
    torch.testing.assert_close(out[:, 1:].reshape(12, E) / 2, g)
