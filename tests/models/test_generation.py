"""Prefill that computes only the logits it needs (``logits_to_keep``), and chunked prefill, with the
dense cache and with the ragged cache of a sparse plan: same logits and greedy tokens as one pass."""

import pytest
import torch

from mixattn.compress import HeadRule, Plan, apply_plan
from mixattn.models import PRESETS, MixtureLM
from tests.conftest import assert_fp_close

RULES = (HeadRule(2, 4.0, 0.0), HeadRule(0, 5.0, 0.0), HeadRule(0, 0.0, 1.0))  # sink 2 + 4; window 5; dense


def _model(name: str, plan: bool) -> MixtureLM:
    cfg = PRESETS[name]
    model = MixtureLM(cfg).double().eval()  # float64: greedy ties cannot flip between the two paths
    if plan:
        apply_plan(model, Plan(tuple(RULES[: cfg.num_kv_heads] for _ in range(cfg.num_layers))))
    return model


@pytest.mark.parametrize("plan", [False, True])
def test_logits_to_keep_is_the_tail_of_the_full_logits(plan):
    model = _model("tiny", plan)
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        full = model(ids).logits
        assert model(ids, logits_to_keep=0).logits.shape == full.shape
        for n in (1, 5):
            tail = model(ids, logits_to_keep=n).logits
            assert tail.shape == (2, n, full.shape[-1])
            assert_fp_close(tail, full[:, -n:], terms=64)


@pytest.mark.parametrize("name", ["tiny", "tiny-moa"])
@pytest.mark.parametrize("plan", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_chunked_prefill_matches_one_pass(name, plan, chunk):
    """Chunks of 1 (token by token), 3 and 7 (the window wraps inside a chunk and between chunks)
    and 16 (one chunk past the end). Kills: reading the ragged cache after the write (slots reused),
    a window that drops its oldest key, and a missing sink in the chunk's mask."""
    model = _model(name, plan)
    ids = torch.randint(1, 256, (2, 23))
    N = 23 + 6
    with torch.no_grad():
        one = model(ids, model.new_cache(N), ref_len=N).logits[:, -1]
        cache = model.new_cache(N)
        for a in range(0, 23, chunk):
            out = model(ids[:, a : a + chunk], cache, start_pos=a, ref_len=N, logits_to_keep=1).logits[:, -1]
    assert_fp_close(out, one, terms=64, chain=8)
    assert torch.equal(model.generate(ids, 6, prefill_chunk=chunk), model.generate(ids, 6))


def test_chunked_prefill_rejects_a_bad_chunk_and_left_padding_with_a_plan():
    model = _model("tiny", True)
    ids = torch.randint(1, 256, (2, 9))
    with pytest.raises(ValueError, match="prefill_chunk"):
        model.generate(ids, 2, prefill_chunk=-1)
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, 2, prefill_chunk=4, left_pad=torch.tensor([0, 2]))
