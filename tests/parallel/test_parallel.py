"""Expert parallelism + FSDP2 on several gloo processes (CPU) against the single-process model.

Every multi-process result is compared with the plain model run in this (non-distributed) test
process on the same global batch and seed: outputs, losses and gradients to an fp32 rounding bound
(``assert_fp_close``), trained parameters after 10 steps, and resumed runs after changing the
number of processes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mixattn.layers.losses import BalanceBuffer
from mixattn.models import MixtureLM, checkpoint
from mixattn.parallel import WorkerFailed, expert_major_order, spawn
from mixattn.train.data import load_corpus
from mixattn.train.loop import TrainConfig, train
from tests.conftest import assert_fp_close
from tests.parallel import workers

TCFG = TrainConfig(steps=10, batch_size=4, seq_len=16, grad_accum=2, eval_every=5, eval_batches=1, warmup_steps=2, lr=3e-3)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXATTN_CACHE", str(tmp_path / "cache"))  # inherited by the spawned ranks


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i % 7}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    return str(path)


def reference_forward_backward():
    """The single-process model on the whole batch, two micro-batches sharing one balance buffer."""
    torch.manual_seed(0)
    model = MixtureLM(workers.CFG)
    buffer = BalanceBuffer()
    out = {"logits": [], "ce": [], "aux": []}
    for micro in range(2):
        x, y = workers.batch(seed=1 + micro)
        o = model(x, balance_buffer=buffer)
        ce = F.cross_entropy(o.logits.flatten(0, 1), y.flatten())
        ((ce + o.aux_loss) / 2).backward()
        out["logits"].append(o.logits.detach())
        out["ce"].append(float(ce.detach()))
        out["aux"].append(float(o.aux_loss.detach()))
    out["grads"] = {n: p.grad for n, p in model.named_parameters()}
    return out


def reference_params(corpus: str, out, cfg: TrainConfig = TCFG, stop_at=None, resume=False) -> dict[str, torch.Tensor]:
    torch.manual_seed(cfg.seed)
    model = MixtureLM(workers.CFG_BIAS)
    train(model, load_corpus(corpus), cfg, out, stop_at=stop_at, resume=resume, progress=False)
    return dict(model.state_dict())


def assert_params_close(actual: dict, expected: dict, steps: int) -> None:
    """Trained weights: each step's update is a function of gradients that agree to fp32 rounding,
    so the bound is the gradient one compounded over the steps (``chain``)."""
    for name, want in expected.items():
        assert_fp_close(actual[name], want, terms=workers.CFG.hidden_dim, chain=4 * steps)


@pytest.mark.parametrize(
    "counts",
    [[[2, 0, 1], [0, 3, 1]], [[0, 0], [0, 0]], [[5]], [[1], [0], [2]], [[0, 4, 0, 1]]],
    ids=["two-ranks", "all-zero", "single", "single-expert", "one-rank"],
)
def test_expert_major_order_matches_a_loop(counts):
    c = torch.tensor(counts)
    S, L = c.shape
    rows, start = {}, 0  # received rows are numbered source-major: (source s, expert l) blocks in order
    for s in range(S):
        for e in range(L):
            rows[(s, e)] = list(range(start, start + int(c[s, e])))
            start += int(c[s, e])
    want = [i for e in range(L) for s in range(S) for i in rows[(s, e)]]
    assert expert_major_order(c).tolist() == want


@pytest.mark.parametrize("nproc,ep", [(2, None), (4, 2)], ids=["2proc-ep2", "4proc-dp2xep2"])
def test_ep_fsdp_forward_loss_grads_and_global_balance_equal_single_process(nproc, ep):
    ranks = spawn(workers.forward_backward, nproc, ep)
    ref = reference_forward_backward()
    assert ranks[0]["mesh"] == (nproc // (ep or nproc), ep or nproc)
    B = ref["logits"][0].shape[0]
    b = B // nproc
    T, d = ref["logits"][0].shape[1], workers.CFG.hidden_dim
    for micro in range(2):
        got = torch.cat([r["logits"][micro] for r in ranks])  # each rank's rows, in rank order
        assert_fp_close(got, ref["logits"][micro], terms=d, chain=2 * workers.CFG.num_layers)
        # losses: the mean over ranks of equal shards is the loss of the whole batch; the global-batch
        # balance loss (micro-batch 2 uses counts buffered over both) included in aux
        for key in ("ce", "aux"):
            assert_fp_close(torch.tensor(ranks[0][key][micro]), torch.tensor(ref[key][micro]), terms=B * T)
    assert b * nproc == B
    grads = ranks[0]["grads"]
    assert set(grads) == set(ref["grads"])
    for name, want in ref["grads"].items():
        # a gradient sums over the B*T tokens of both micro-batches, through the layers
        assert_fp_close(grads[name], want, terms=2 * B * T, chain=2 * workers.CFG.num_layers)
    # bf16 compute (8 significant bits) through 2 layers, fp32 weights kept: close to fp32, not equal
    bf16 = torch.cat([r["bf16_logits"] for r in ranks])
    assert bf16.dtype == torch.bfloat16 and ranks[0]["bf16_weight_dtype"] == torch.float32
    scale = float(ref["logits"][0].abs().max())
    torch.testing.assert_close(bf16.float(), ref["logits"][0], atol=0.05 * scale, rtol=0)
    assert not torch.equal(bf16.float(), ref["logits"][0])
    errors = ranks[0]["errors"]
    assert any("expert-parallel size 3 must be >= 1 and divide the world size" in e for e in errors)
    assert any(f"must be a multiple of the number of processes ({nproc})" in e for e in errors)
    assert any("3 experts cannot be split evenly over ep=" in e for e in errors)


def test_ten_steps_at_two_processes_equal_single_process_and_resume_at_one(tmp_path, corpus):
    stop = 5
    params = spawn(workers.train_twice, 2, corpus, TCFG, str(tmp_path / "whole2"), str(tmp_path / "split2"), stop)[0]
    want = reference_params(corpus, tmp_path / "whole1")
    assert_params_close(params, want, TCFG.steps)
    # the 2-process run stopped at step 5 continues in one process from its consolidated checkpoint
    assert checkpoint.load_train_state(tmp_path / "split2" / "checkpoint")["step"] == stop
    resumed = reference_params(corpus, tmp_path / "split2", resume=True)
    assert_params_close(resumed, want, TCFG.steps)
    # and the consolidated weights load as an ordinary checkpoint (what export and generate read)
    model = checkpoint.load(tmp_path / "whole2" / "checkpoint")
    assert_params_close(dict(model.state_dict()), want, TCFG.steps)


@pytest.mark.slow
def test_save_at_four_processes_load_at_two_and_continue_equals_uninterrupted(tmp_path, corpus):
    cfg = dataclasses.replace(TCFG, batch_size=8)
    out = str(tmp_path / "run")
    spawn(workers.train_run, 4, corpus, cfg, out, 4)  # stops and saves at step 4 (DCP shards of 4 ranks)
    params = spawn(workers.train_run, 2, corpus, cfg, out, None, True)[0]
    want = reference_params(corpus, tmp_path / "whole", cfg)
    assert_params_close(params, want, cfg.steps)


@pytest.mark.slow
def test_save_at_one_process_load_at_four_and_continue_equals_uninterrupted(tmp_path, corpus):
    cfg = dataclasses.replace(TCFG, batch_size=8)
    reference_params(corpus, tmp_path / "run", cfg, stop_at=4)
    params = spawn(workers.train_run, 4, corpus, cfg, str(tmp_path / "run"), None, True)[0]
    want = reference_params(corpus, tmp_path / "whole", cfg)
    assert_params_close(params, want, cfg.steps)


def test_a_failing_rank_ends_the_job_with_its_error_on_rank_0():
    with pytest.raises(WorkerFailed) as info:
        spawn(workers.fail_on_rank_1, 2, timeout_s=60)
    errors = info.value.errors
    assert "vocab_size" in errors[1]  # rank 1's own error
    # rank 0 was waiting in the expert all-to-all: it names rank 1 and its error, not a bare transport error
    assert errors[0].startswith("RankFailed: rank 1: ValueError: token id 263 >= vocab_size 256"), errors[0]


@pytest.mark.slow
def test_a_rank_that_never_arrives_is_a_timeout_error_not_a_hang():
    with pytest.raises(WorkerFailed) as info:
        spawn(workers.hang_on_rank_1, 2, timeout_s=5)  # rank 1 is terminated after 3 x 5 s
    assert "timed out" in info.value.errors[0].lower(), info.value.errors[0]
