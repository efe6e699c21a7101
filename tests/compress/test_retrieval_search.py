"""The retrieval side of the plan search: copy sources, the copy profile, its weight in the MILP and
selection of the candidate by generation hits."""


import math

import pytest
import torch

import mixattn
from mixattn.compress import optimize as optimize_mod
from mixattn.compress import profile as profiling
from mixattn.compress import select
from mixattn.compress.calibration import CalibSample
from mixattn.compress.optimize import optimize
from mixattn.compress.plan import DENSE, HeadRule, Plan
from mixattn.compress.select import choose, ppl_ratios, select_by_validation
from mixattn.models import PRESETS, MixtureLM


def test_copy_sources_pairs_each_answer_row_with_every_prompt_occurrence():
    # prompt: 0..9, the answer [7, 8, 9] occurs at 3..5 and 11..13; the answer starts at 16
    ids = torch.tensor([0, 1, 2, 7, 8, 9, 3, 4, 5, 6, 1, 7, 8, 9, 2, 3, 7, 8, 9])
    pairs = profiling.copy_sources(ids, 16, probe=3)
    # row 15 predicts ids[16] = 7 (held at 3 and 11), row 16 predicts 8 (4, 12), row 17 predicts 9 (5, 13)
    assert sorted(pairs) == [(15, 3), (15, 11), (16, 4), (16, 12), (17, 5), (17, 13)]
    assert profiling.copy_sources(ids, 16, probe=4) == pairs  # the probe is capped at the answer's length
    near = torch.tensor([0, 7, 8, 9, 6, 2, 7, 8, 9, 1])  # answer [7, 8, 9, 1]; the prompt has [7, 8, 9, 6]
    assert profiling.copy_sources(near, 6, probe=3) == [(5, 1), (6, 2), (7, 3)]  # 6 != 1: that row copies nothing
    assert profiling.copy_sources(near, 6, probe=4) == []  # no occurrence of the first 4 answer tokens
    assert profiling.copy_sources(torch.tensor([1, 2, 3, 4, 5, 6]), 3) == []  # answer [4, 5, 6] not in the prompt
    assert profiling.copy_sources(ids, len(ids)) == []  # no answer


def test_copy_profile_holds_the_attention_on_the_copied_tokens():
    torch.manual_seed(0)
    model = MixtureLM(PRESETS["tiny"].evolve(max_seq_len=512)).double().eval()
    T, start = 160, 150
    ids = torch.randint(10, 256, (T,), generator=torch.Generator().manual_seed(1))
    ids[20:30] = ids[start:T]  # the answer is copied from positions 20..29 (block 0; its rows are in block 2)
    mask = torch.zeros(T, dtype=torch.bool)
    mask[start - 1 : T - 1] = True
    prof = profiling.run(model, [CalibSample(ids, mask, T)], (T,), progress=False)
    copy = prof.copy[T]  # (L, Hkv, nb, nb)
    assert copy[..., 2, 0].min() > 0  # every head puts some attention on the sources
    assert copy.sum() == copy[..., 2, 0].sum()  # ... and the profile holds nothing else
    # brute force for layer 0: sum over the group's query heads of A[row, source]
    with profiling.capture(profiling.attention_modules(model)) as caps, torch.no_grad():
        model(ids[None])
    q, k = caps[0][0][0], caps[0][1][0]
    G = q.shape[0] // k.shape[0]
    want = torch.zeros(k.shape[0], dtype=torch.float64)
    for h in range(q.shape[0]):
        A = torch.softmax((q[h] @ k[h // G].T / q.shape[-1] ** 0.5).masked_fill(
            ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1)  # fmt: skip
        want[h // G] += sum(float(A[start - 1 + t, 20 + t]) for t in range(T - start))
    torch.testing.assert_close(copy[0, :, 2, 0], want)


def _profile(copy_head: int, N: int = 256) -> profiling.Profile:
    """One layer, two KV heads, no gradient influence; ``copy_head`` copies from the first block."""
    nb = N // 64
    copy = torch.zeros(1, 2, nb, nb, dtype=torch.float64)
    copy[0, copy_head, nb - 1, 0] = 1.0  # the last rows read block 0
    copy[0, 1 - copy_head, nb - 1, nb - 1] = 1.0  # the other head reads locally
    return profiling.Profile((N,), {N: torch.zeros(1, 2, nb, nb, dtype=torch.float64)}, {N: 1}, copy={N: copy})


def test_the_copy_weight_keeps_the_copying_head_full():
    rules = [DENSE, HeadRule(0, 64.0, 0.0)]  # full, or a 64-token window (drops block 0 for the last rows)
    for head in (0, 1):
        plan = optimize(_profile(head), 0.7, rules=rules, copy_weight=1.0)
        assert plan.layers[0][head] == DENSE and plan.layers[0][1 - head] == rules[1]


def test_validation_prefers_retrieval_hits_over_answer_loss(monkeypatch):
    torch.manual_seed(0)
    model = MixtureLM(PRESETS["tiny"].evolve(max_seq_len=512)).float().eval()
    ids = torch.randint(0, 256, (128,), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(128, dtype=torch.bool)
    mask[-5:-1] = True
    val = [CalibSample(ids, mask, 128, own=True, source=object())]
    sparse = Plan.uniform(model.cfg.num_layers, model.cfg.num_kv_heads, 0.5, 128, 4)
    dense = Plan.dense(model.cfg.num_layers, model.cfg.num_kv_heads)
    applied = []
    monkeypatch.setattr("mixattn.compress.apply.apply_plan", lambda m, p: applied.append(p))
    monkeypatch.setattr("mixattn.compress.apply.remove_plan", lambda m: None)
    real = select.loss_and_hit
    monkeypatch.setattr(select, "loss_and_hit", lambda m, tok, s: (real(m, None, s)[0], tok and applied[-1] is sparse))
    chosen, scores = select_by_validation(model, [dense, sparse], val, tok=object())
    assert chosen is sparse and scores["hits"] == [0, 1] and scores["ppl"] is None
    chosen, scores = select_by_validation(model, [dense, sparse], val)  # no tokenizer: loss only
    losses = scores["losses"]
    assert scores["hits"] == [0, 0] and chosen is [dense, sparse][min(range(2), key=losses.__getitem__)]


def test_loss_matrix_copy_term_is_scaled_per_length():
    prof = _profile(0)
    rules = [DENSE, HeadRule(0, 64.0, 0.0)]
    base = optimize_mod.loss_matrix(prof, rules)
    both = optimize_mod.loss_matrix(prof, rules, copy_weight=2.0)
    assert (base == 0).all()  # no influence at all
    # head 0's window drops its whole copy mass (mean head total is 1, so that mass scales to 1) x weight 2
    assert both[0, 1] == 2.0 and both[1, 1] == 0.0 and (both[:, 0] == 0).all()


def test_choose_rules_out_candidates_over_the_perplexity_tolerance():
    losses, hits = [0.5, 0.9, 0.7], [3, 2, 2]
    assert choose(losses, hits) == 0  # most hits
    assert choose(losses, hits, [1.20, 1.04, 1.01]) == 2  # 0 is ruled out; 1 and 2 tie on hits, 2 has less loss
    assert choose(losses, hits, [1.20, 1.04, 1.01], ppl_tolerance=0.25) == 0
    assert choose(losses, hits, [1.30, 1.20, 1.10]) == 2  # none admissible: the lowest perplexity ratio


def test_ppl_ratios_are_paired_with_dense_on_the_same_windows():
    torch.manual_seed(0)
    model = MixtureLM(PRESETS["tiny"].evolve(max_seq_len=512)).float().eval()
    L, H = model.cfg.num_layers, model.cfg.num_kv_heads
    stream = torch.randint(0, 256, (2 * 256 + 1,), generator=torch.Generator().manual_seed(3))
    dense, narrow = Plan.dense(L, H), Plan.uniform(L, H, 0.1, 256, 4)
    got = ppl_ratios(model, [dense, narrow], stream, 256, 2)
    assert got[0]["ratio"] == 1.0 and got[0]["windows"] == 2  # the dense plan is dense: identical NLLs
    from mixattn.compress.apply import apply_plan, remove_plan
    from mixattn.metrics.perplexity import window_nlls

    apply_plan(model, narrow)
    want = window_nlls(model, stream, 256, 2)["nll"]
    remove_plan(model)
    base = window_nlls(model, stream, 256, 2)["nll"]
    assert abs(got[1]["ratio"] - math.exp(sum(want) / 2 - sum(base) / 2)) < 1e-9 and got[1]["ratio"] != 1.0


def test_full_elastic_candidate_keeps_its_density_at_lengths_past_the_profile():
    from mixattn.compress.pipeline import candidates

    N = 256
    prof = _profile(0, N)
    prof.influence[N] = torch.rand(prof.influence[N].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plans = candidates(prof, 0.6, (N, 4 * N), None, "m")
    elastic = plans["full+elastic"]
    assert all(r == DENSE or (r.alpha == 0 and r.beta > 0) for layer in elastic.layers for r in layer)
    for label, plan in plans.items():
        assert max(plan.density([n]) for n in (N, 4 * N)) <= 0.6 + 1e-9, label
    # elastic rules hold their share of N: the density falls only by the sink's share
    assert elastic.density([4 * N]) >= elastic.density([N]) - 64 / N


def test_rank_candidates_follow_the_influence_where_the_copy_term_disagrees():
    """Head 0 carries the long-range gradient influence, head 1 the copy attention, and the budget
    keeps one head whole: the copy-weighted candidates keep head 1, the influence-ranked ones (the
    duo-gradient shape) head 0."""
    from mixattn.compress.pipeline import candidates

    N, nb = 512, 8
    infl, copy = (torch.zeros(1, 2, nb, nb, dtype=torch.float64) for _ in range(2))
    infl[0, :, nb - 1, nb - 1], copy[0, :, nb - 1, nb - 1] = 3.0, 1.0  # equal local parts on both heads
    infl[0, 0, nb - 1, 1] = 1.0  # the long-range parts, past the 64-token sink: influence on head 0 ...
    copy[0, 1, nb - 1, 1] = 3.0  # ... and copy attention on head 1, the larger term after scaling
    prof = profiling.Profile((N,), {N: infl}, {N: 1}, copy={N: copy})
    plans = candidates(prof, 0.7, (N, 4 * N), None, "m")
    for shape in ("window", "elastic"):
        # the head kept whole at N (full, or a 448 window, which is whole at 512 and cheaper further out)
        full = [h for h in (0, 1) if plans[f"full+{shape}"].layers[0][h].density(N) > 0.95]
        rank = [h for h in (0, 1) if plans[f"rank+{shape}"].layers[0][h].density(N) > 0.95]
        assert (full, rank) == ([1], [0]), shape


@pytest.mark.parametrize("own", [True, False])
def test_loss_and_hit_from_one_prefill_equals_a_full_forward_and_a_fresh_generation(own):
    """The answer loss teacher-forced through a copy of the prompt's cache equals the loss of one full
    forward at the same reference length, and the greedy hit equals ``calibration.retrieves``
    (a separate ``generate``), under a sparse plan whose windows the answer runs past."""
    from mixattn.compress.apply import apply_plan
    from mixattn.compress.calibration import retrieves
    from mixattn.data.tasks import Sample

    torch.manual_seed(0)
    model = MixtureLM(PRESETS["tiny"].evolve(max_seq_len=512)).float().eval()
    tok = mixattn.ByteTokenizer()
    apply_plan(model, Plan.uniform(model.cfg.num_layers, model.cfg.num_kv_heads, 0.3, 160, 4))
    prompt = torch.randint(0, 256, (140,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        gen = model.generate(prompt[None], 6)[0, 140:]  # the model's own answer: its greedy tokens
    answers = (tok.decode(gen[:3].tolist()),) if own else ("\x00never",)
    ids = torch.cat([prompt, gen])
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[139:-1] = True
    s = CalibSample(ids, mask, 160, own=own, source=Sample(prompt.tolist(), answers, prompt.tolist(), gen.tolist(), {}))
    loss, hit = select.loss_and_hit(model, tok, s)
    with torch.no_grad():
        logits = model(ids[None], ref_len=140 + 16).logits[0, :-1]
    want = float(torch.nn.functional.cross_entropy(logits[mask[:-1]], ids[1:][mask[:-1]]))
    assert abs(loss - want) <= 1e-5 * max(1.0, want)
    assert hit == (retrieves(model, tok, s.source) if own else None) and (hit is True or not own)


def test_validation_measures_perplexity_lazily_and_chooses_as_if_it_measured_all(monkeypatch):
    """Perplexity is measured in choose()'s order until a candidate passes the guard: the choice equals
    choose() on every candidate's ratio, and the candidates behind the first admissible one are skipped."""
    plans = [Plan.uniform(2, 2, d, 256) for d in (0.3, 0.4, 0.5, 0.6)]
    losses, hits = [0.1, 0.2, 0.3, 0.4], [2, 3, 3, 1]  # choose() order: 1, 2, 0, 3
    monkeypatch.setattr(select, "answer_scores", lambda *a, **k: (losses, hits))
    for ratios in ([1.2, 1.1, 1.03, 1.0], [1.02, 1.01, 1.2, 1.3], [1.3, 1.2, 1.1, 1.4]):
        measured = []

        def fake(model, plans_, stream, length, windows, progress=False, order=None, stop=None, ratios=ratios,
                 measured=measured):
            out = [None] * len(plans_)
            for i in order:
                measured.append(i)
                out[i] = {"ratio": ratios[i]}
                if stop(out[i]):
                    break
            return out

        monkeypatch.setattr(select, "ppl_ratios", fake)
        chosen, scores = select_by_validation(None, plans, [], None, torch.zeros(9), 4, ppl_tolerance=0.05)
        assert chosen is plans[choose(losses, hits, ratios)]
        first_ok = next(i for i in (1, 2, 0, 3) if ratios[i] <= 1.05) if min(ratios) <= 1.05 else None
        want = [1, 2, 0, 3][: [1, 2, 0, 3].index(first_ok) + 1] if first_ok is not None else [1, 2, 0, 3]
        assert measured == want and [r is not None for r in scores["ppl"]] == [i in want for i in range(4)]


def test_loss_and_hit_names_a_sample_without_answer_positions():
    model = MixtureLM(PRESETS["tiny"].evolve(max_seq_len=512)).float().eval()
    s = CalibSample(torch.arange(20), torch.zeros(20, dtype=torch.bool), 20, task="passkey")
    with pytest.raises(ValueError, match="passkey sample has no answer position"):
        select.loss_and_hit(model, None, s)
