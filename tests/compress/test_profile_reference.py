"""The profiler's outputs against a reference computed here, on a float64 tiny GQA model: the
attention matrices are built explicitly in a patched ``attend`` and dL/dA comes from autograd (the
profiler instead rebuilds A from captured q, k and gets dL/dA as dL/do v^T). Influence block sums,
the mass-outside score, the copy profile and the induction score are then written out as loops."""

import math

import pytest
import torch

import mixattn.layers.attention as attention_mod
from mixattn.compress import profile as profiling
from mixattn.compress.calibration import CalibSample
from mixattn.models import PRESETS, MixtureLM
from tests.conftest import assert_fp_close

T, BLOCK = 330, 64  # 6 blocks, the last partial; T > 64 + 256 so the mass-outside score is not 0
NB = math.ceil(T / BLOCK)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MixtureLM(PRESETS["tiny"].evolve(max_seq_len=1024)).double().eval()


def _sample():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (T,), generator=g)
    ids[-5:] = ids[100:105]  # the answer (last 5 tokens) is copied from positions 100..104
    mask = torch.zeros(T, dtype=torch.bool)
    mask[T - 6 : T - 1] = True  # logits at T-6 .. T-2 predict the answer
    return ids, mask


def _explicit_attention(monkeypatch, store):
    """Patch ``attend`` to softmax(q k^T / sqrt(D)) (causal) @ v with A kept (and its grad retained)."""

    def attend(q, k, v, ctx, spec):
        G = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        n = s.shape[-1]
        A = torch.softmax(s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")), -1)
        if A.requires_grad:
            A.retain_grad()
        store.append(A)
        return A @ v

    monkeypatch.setattr(attention_mod, "attend", attend)


def _block_sum_loop(x):
    out = torch.zeros(NB, NB, dtype=torch.float64)
    for i in range(x.shape[0]):
        for bj in range(NB):
            out[i // BLOCK, bj] += x[i, bj * BLOCK : (bj + 1) * BLOCK].sum()
    return out


def test_profile_matches_autograd_reference(model, monkeypatch):
    ids, mask = _sample()
    cfg = model.cfg
    G = cfg.num_heads // cfg.num_kv_heads
    prof = profiling.run(model, [CalibSample(ids, mask, T)], (T,), progress=False)

    As: list = []
    with monkeypatch.context() as mp:
        _explicit_attention(mp, As)
        logits = model(ids[None]).logits[0]
        rows = mask.nonzero().flatten()
        loss = -torch.stack([torch.log_softmax(logits[t], -1)[ids[t + 1]] for t in rows]).mean()
        loss.backward()
    model.zero_grad(set_to_none=True)
    assert len(As) == cfg.num_layers
    infl = torch.zeros(cfg.num_layers, cfg.num_kv_heads, NB, NB, dtype=torch.float64)
    mass = torch.zeros(cfg.num_layers, cfg.num_kv_heads, dtype=torch.float64)
    copy = torch.zeros_like(infl)
    pairs = [(T - 6 + t, 100 + t) for t in range(5)]  # the row predicting answer token t, the prompt position holding it
    for layer, A_all in enumerate(As):
        for h in range(cfg.num_heads):
            A, dA = A_all[0, h].detach(), A_all.grad[0, h]
            S = (dA * A).sum(-1, keepdim=True)
            dl = torch.where(A < 1, -A * (dA - S) / (1 - A), torch.zeros_like(A))
            infl[layer, h // G] += _block_sum_loop(dl.abs())
            far = [float(sum(A[i, j] for j in range(64, i - 256 + 1))) for i in range(320, T)]
            mass[layer, h // G] += sum(far) / len(far) / G
            for i, j in pairs:
                copy[layer, h // G, i // BLOCK, j // BLOCK] += A[i, j]
    assert prof.done == 1 and prof.counts == {T: 1}
    # the profiler's loss is cross-entropy of fp32 logits: dL/dlogits carries fp32 rounding of a
    # vocab-sized softmax, which the float64 backward then carries to dL/dA
    assert_fp_close(prof.influence[T].float(), infl.float(), terms=model.cfg.vocab_size)
    assert_fp_close(prof.scores["mass_outside"], mass, terms=T)
    assert_fp_close(prof.copy[T], copy, terms=T)
    assert float(copy.sum()) > 0 and float(mass.min()) > 0


def test_induction_score_is_the_attention_to_the_token_after_the_earlier_occurrence(model, monkeypatch):
    n = 256
    got = profiling.induction_scores(model, n=n, seed=3)  # its own generator: not the global RNG (seeded 0)
    r = torch.randint(0, model.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(3))
    As: list = []
    with monkeypatch.context() as mp, torch.no_grad():
        _explicit_attention(mp, As)
        model(torch.cat([r, r])[None])
    cfg = model.cfg
    G = cfg.num_heads // cfg.num_kv_heads
    want = torch.zeros(cfg.num_layers, cfg.num_kv_heads, dtype=torch.float64)
    for layer, A in enumerate(As):
        for h in range(cfg.num_heads):
            # token at n + s (s >= 1) repeats token s; the token after that earlier occurrence is s + 1
            want[layer, h // G] += sum(float(A[0, h, n + s, s + 1]) for s in range(1, n)) / (n - 1) / G
    torch.testing.assert_close(got.double(), want, rtol=0, atol=4 * torch.finfo(torch.float32).eps * n**0.5)


def test_resumed_profile_accumulates_like_one_pass(model, tmp_path):
    ids, mask = _sample()
    other = CalibSample(ids.roll(7), mask, T)
    both = profiling.run(model, [CalibSample(ids, mask, T), other], (T,), progress=False)
    profiling.run(model, [CalibSample(ids, mask, T)], (T,), tmp_path / "p.pt", progress=False)
    again = profiling.run(model, [CalibSample(ids, mask, T), other], (T,), tmp_path / "p.pt", resume=True, progress=False)
    assert again.done == 2 and again.counts == {T: 2}
    assert torch.equal(again.influence[T], both.influence[T])
    torch.testing.assert_close(again.scores["mass_outside"], both.scores["mass_outside"], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="not among the profile lengths"):
        profiling.run(model, [CalibSample(ids, mask, T)], (T + 1,), progress=False)


def test_mass_outside_is_the_mean_over_samples_and_zero_for_short_rows(model):
    ids, mask = _sample()
    a, b = CalibSample(ids, mask, T), CalibSample(ids.roll(11), mask, T)
    one_a = profiling.run(model, [a], (T,), progress=False).scores["mass_outside"]
    one_b = profiling.run(model, [b], (T,), progress=False).scores["mass_outside"]
    both = profiling.run(model, [a, b], (T,), progress=False).scores["mass_outside"]
    torch.testing.assert_close(both, (one_a + one_b) / 2)
    short = torch.softmax(torch.randn(320, 320, dtype=torch.float64), -1).tril()
    assert profiling._mass_outside(short) == 0.0  # no query past sink + local window


def test_copy_sources_stop_at_the_prompt_end():
    # the answer [1, 2, 3, 4] starts right after an occurrence of [1, 2, 3]: its 4th token is not in the prompt
    ids = torch.tensor([9, 1, 2, 3, 1, 2, 3, 4])
    assert profiling.copy_sources(ids, 4, probe=3) == [(3, 1), (4, 2), (5, 3)]
