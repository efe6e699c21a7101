"""mixattn plans on transformers' own Llama / Qwen2 / Mistral classes (tiny random configs, offline):
logits equal MixtureLM with the same plan and an independent per-head-mask reference written here;
greedy generate with ``SparseCache`` gives MixtureLM's tokens; the cache holds density x the dense bytes."""

import math
import os
from pathlib import Path

import pytest
import torch

import mixattn
from mixattn.compress.plan import HeadRule, Plan
from tests.conftest import assert_fp_close

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
hf = pytest.importorskip("mixattn.integrations.transformers")

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
KINDS = {"llama": ("LlamaConfig", "LlamaForCausalLM", {}),
         "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
         "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None})}  # fmt: skip
# per KV head: a sink + elastic window, a pure window, dense, a sink + short window; all bite at T = 40
PLAN = Plan(((HeadRule(2, 4.0, 0.1), HeadRule(0, 8.0, 0.0)), (HeadRule(0, 0.0, 1.0), HeadRule(3, 1.0, 0.2))))


def _hf_model(kind="llama", **kw):
    conf, cls, extra = KINDS[kind]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, conf)(**{**SMALL, **extra, **kw})).eval()
    with torch.no_grad():  # HF zero-inits some biases / sets norms to 1: random values let tests fail
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ids(B=2, T=40, seed=1):
    return torch.randint(1, SMALL["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def _close(actual, expected):
    assert_fp_close(actual, expected, terms=SMALL["intermediate_size"], chain=2 * SMALL["num_hidden_layers"] + 2)


# ---------------------------------------------------------------- the reference, independent of mixattn


def _rule_mask(rule: HeadRule, T: int) -> torch.Tensor:
    """(T, T) bool: query i sees key j when j <= i and (j < sink or i - j < span(T))."""
    span = min(T, max(1, math.floor(rule.alpha + rule.beta * T)))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= i) & ((j < rule.sink) | (i - j < span))


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Eager float64 attention with a per-query-head mask from the plan (query head h -> KV head h // G)."""
    rules = module.test_plan.layers[module.layer_idx]
    B, H, T, D = query.shape
    G = H // key.shape[1]
    mask = torch.stack([_rule_mask(rules[h // G], T) for h in range(H)])  # (H, T, T)
    k, v = key.double().repeat_interleave(G, 1), value.double().repeat_interleave(G, 1)
    s = (query.double() @ k.transpose(-1, -2)) * scaling
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return (p @ v).to(query.dtype).transpose(1, 2).contiguous(), None


def _reference_logits(model, plan, ids):
    transformers.AttentionInterface.register("test_perhead_reference", _reference_attention)
    previous = model.config._attn_implementation
    for layer in model.model.layers:
        layer.self_attn.test_plan = plan
    model.set_attn_implementation("test_perhead_reference")
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        model.set_attn_implementation(previous)


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_equal_mixturelm_and_the_per_head_mask_reference(kind, tmp_path):
    model = _hf_model(kind)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
    ref = _reference_logits(model, PLAN, ids)
    model.save_pretrained(tmp_path)
    ours = mixattn.apply_plan(mixattn.load(tmp_path), PLAN)
    hf.apply_plan(model, PLAN)
    with torch.no_grad():
        got = model(ids).logits
        want = ours(ids).logits
    assert (got - dense).abs().max() > 1e-2  # the plan bites: a no-op attention would fail below
    _close(got, ref)
    _close(got, want)


@pytest.mark.parametrize("kind", list(KINDS))
def test_greedy_generate_with_sparse_cache_gives_mixturelm_tokens(kind, tmp_path):
    model = _hf_model(kind)
    model.save_pretrained(tmp_path)
    ours = mixattn.apply_plan(mixattn.load(tmp_path), PLAN)
    hf.apply_plan(model, PLAN)
    ids, n = _ids(), 12
    out = model.generate(ids, max_new_tokens=n, do_sample=False, past_key_values=hf.SparseCache(model, max_new_tokens=n),
                         pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert torch.equal(out, ours.generate(ids, n))


def _padded_pair(tmp_path, kind, lengths, seeds):
    """The HF model and MixtureLM with PLAN, and a left-padded batch of two prompts of ``lengths``:
    (model, ours, prompts, ids (2, T), left_pad (2,), attention_mask (2, T))."""
    model = _hf_model(kind)
    model.save_pretrained(tmp_path)
    ours = mixattn.apply_plan(mixattn.load(tmp_path), PLAN)
    hf.apply_plan(model, PLAN)
    prompts = [_ids(1, T, seed=s)[0].tolist() for T, s in zip(lengths, seeds)]
    ids, pad = mixattn.pad_left(prompts)
    mask = (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()
    return model, ours, prompts, ids, pad, mask


def test_left_padded_batch_generates_like_each_prompt_alone(tmp_path):
    model, ours, (long, short), ids, pad, mask = _padded_pair(tmp_path, "llama", (40, 29), seeds=(2, 3))
    n = 8
    cache = hf.SparseCache(model, max_new_tokens=n)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, past_key_values=cache,
                         pad_token_id=0, eos_token_id=None)  # fmt: skip
    assert torch.equal(out, ours.generate(ids, n, left_pad=pad))
    alone = model.generate(torch.tensor([short]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None,
                           past_key_values=hf.SparseCache(model, max_cache_len=len(long) + n))  # fmt: skip
    assert torch.equal(out[1, -n:], alone[0, -n:])


def test_left_padded_forward_without_a_cache_equals_mixturelm(tmp_path):
    """N is the batch's (padded) length, as in MixtureLM; sinks start at each row's first real token."""
    model, ours, _, ids, pad, mask = _padded_pair(tmp_path, "qwen2", (40, 31), seeds=(4, 5))
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
        want = ours(ids, left_pad=pad).logits
    _close(got[0], want[0])
    _close(got[1, int(pad[1]) :], want[1, int(pad[1]) :])  # logits at padded positions are meaningless


def test_a_module_scaling_other_than_one_over_sqrt_d_is_honoured():
    model = _hf_model("llama")
    for layer in model.model.layers:
        layer.self_attn.scaling = 0.2  # e.g. query_pre_attn_scalar-style models; the reference reads it too
    ids = _ids()
    ref = _reference_logits(model, PLAN, ids)
    with torch.no_grad():
        _close(hf.apply_plan(model, PLAN)(ids).logits, ref)


def test_right_padding_is_refused():
    model = hf.apply_plan(_hf_model("llama"), PLAN)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, -3:] = 0
    with pytest.raises(ValueError, match="left padding only"), torch.no_grad():
        model(_ids(), attention_mask=mask)


def test_decoding_with_transformers_dense_cache_equals_a_full_forward():
    """Without a SparseCache, N is the number of keys: each cached step equals a full forward."""
    model = hf.apply_plan(_hf_model("qwen2"), PLAN)
    ids = _ids(T=41)
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        past = model(ids[:, :-1], use_cache=True).past_key_values
        step = model(ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    _close(step, full)


def test_cache_allocates_the_plans_density_of_the_dense_bytes():
    model = hf.apply_plan(_hf_model("llama"), PLAN, impl="reference")  # no flex compile for a 200-token prompt
    ids, n = _ids(T=200), 8
    N = ids.shape[1] + n
    cache = hf.SparseCache(model, max_new_tokens=n)
    model.generate(ids, max_new_tokens=n, do_sample=False, past_key_values=cache, pad_token_id=0, eos_token_id=None)
    dense_run = hf.remove_plan(model).generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0,
                                                eos_token_id=None, return_dict_in_generate=True)  # fmt: skip
    dense = sum(x.nbytes for layer in dense_run.past_key_values.layers for x in (layer.keys, layer.values))
    B, D = ids.shape[0], SMALL["hidden_size"] // SMALL["num_attention_heads"]
    full = 2 * B * D * 4 * N * SMALL["num_hidden_layers"] * SMALL["num_key_value_heads"]  # K+V fp32 at N tokens
    assert cache.nbytes() == round(PLAN.density([N]) * full)
    assert abs(cache.nbytes() / dense - PLAN.density([N])) <= 0.02 * PLAN.density([N])
    assert PLAN.density([N]) < 0.6  # the saving is real


def test_remove_plan_restores_the_model_exactly():
    model = _hf_model("mistral")
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        hf.apply_plan(hf.apply_plan(model, PLAN), PLAN)  # applying twice still remembers the original
        assert model.config._attn_implementation == "mixattn" and hf.has_plan(model)
        hf.remove_plan(model)
        assert model.config._attn_implementation == "sdpa" and not hf.has_plan(model)
        assert torch.equal(model(ids).logits, dense)


def test_an_all_dense_plan_leaves_logits_unchanged():
    model = _hf_model("llama")
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        hf.apply_plan(model, Plan.dense(2, 2))
        _close(model(ids).logits, dense)


def test_the_docs_example_runs(tmp_path):
    text = (Path(__file__).resolve().parents[2] / "docs" / "transformers.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    _hf_model("llama").save_pretrained(tmp_path / "m")
    PLAN.save(tmp_path / "plan.json")
    code = code.replace("path/to/llama-dir", str(tmp_path / "m")).replace('"plan.json"', repr(str(tmp_path / "plan.json")))
    scope = {"ids": _ids()}
    exec(code, scope)
    assert scope["model"].config._attn_implementation == "mixattn"
    assert 40 < scope["out"].shape[1] <= 40 + 64 and scope["cache"].nbytes() > 0


def test_compress_on_a_transformers_dir_writes_a_plan_this_module_applies(tmp_path):
    """``mixattn compress`` reads an HF directory (mixattn.load + its tokenizer); the plan it writes
    runs on the transformers model and agrees with MixtureLM."""
    from mixattn.compress.pipeline import compress

    torch.manual_seed(0)
    conf = transformers.LlamaConfig(**{**SMALL, "vocab_size": 49152, "max_position_embeddings": 1024})
    transformers.LlamaForCausalLM(conf).save_pretrained(tmp_path / "m")
    mixattn.load_tokenizer("smollm2-135m").save(tmp_path / "m")
    plan = compress(str(tmp_path / "m"), density=0.5, lengths=(160,), samples=1, out=tmp_path / "plan.json",
                    progress=False, work_dir=tmp_path / "work")  # fmt: skip
    assert abs(plan.density() - 0.5) < 0.05
    model = hf.apply_plan(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval(),
                          Plan.load(tmp_path / "plan.json"), impl="reference")  # fmt: skip
    ours = mixattn.apply_plan(mixattn.load(tmp_path / "m"), plan, impl="reference")
    ids = torch.randint(1, 49152, (1, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _close(model(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("failure", ["raises", "wrong"])
def test_where_compiled_flex_fails_the_reference_kernel_is_used(failure, monkeypatch):
    def broken(q, *args, **kwargs):
        if failure == "raises":
            raise RuntimeError("no C compiler")
        return torch.zeros_like(q)  # e.g. a miscompiled kernel

    monkeypatch.setitem(mixattn.kernels._REGISTRY["sparse_attention"], "flex", broken)
    monkeypatch.setattr(hf, "_FLEX_WORKS", {})
    model = _hf_model("llama")
    ids = _ids(T=130)  # >= one flex block: "auto" picks flex at inference
    ref = _reference_logits(model, PLAN, ids)
    why = "no C compiler" if failure == "raises" else "differs from the reference"
    with pytest.warns(UserWarning, match=f"FlexAttention is unavailable .*{why}"), torch.no_grad():
        got = hf.apply_plan(model, PLAN)(ids).logits
    _close(got, ref)
    if failure == "raises":
        with pytest.raises(RuntimeError, match="no C compiler"), torch.no_grad():  # an explicit impl is kept
            hf.apply_plan(model, PLAN, impl="flex")(ids)


# ---------------------------------------------------------------- errors


def test_unsupported_architecture_and_mismatched_plan_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has model_type 'gpt2'"):
        hf.apply_plan(gpt2, PLAN)
    model = _hf_model("llama")
    with pytest.raises(ValueError, match="2 layers x 3 KV heads; the model has 2 x 2"):
        hf.apply_plan(model, Plan.dense(2, 3))
    with pytest.raises(ValueError, match="unknown implementation 'fast'"):
        hf.apply_plan(model, PLAN, impl="fast")
    assert not hf.has_plan(model) and model.config._attn_implementation == "sdpa"


def test_sparse_cache_misuse_gets_clear_errors():
    model = _hf_model("llama")
    with pytest.raises(ValueError, match="no mixattn plan"):
        hf.SparseCache(model, max_new_tokens=4)
    hf.apply_plan(model, PLAN)
    with pytest.raises(ValueError, match="exactly one of"):
        hf.SparseCache(model, max_new_tokens=4, max_cache_len=50)
    with pytest.raises(ValueError, match="sized for 44 tokens"):
        model.generate(_ids(), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                       past_key_values=hf.SparseCache(model, max_new_tokens=4))  # fmt: skip
    cache = hf.SparseCache(model, max_new_tokens=4)
    hf.remove_plan(model)
    with pytest.raises(ValueError, match="never written"), torch.no_grad():
        model(_ids(), past_key_values=cache, use_cache=True)
        model(_ids(T=1), past_key_values=cache, use_cache=True)


def test_native_sliding_window_shorter_than_the_input_is_refused():
    model = hf.apply_plan(_hf_model("mistral", sliding_window=16), PLAN)
    with pytest.raises(ValueError, match=r"own sliding window \(16\)"), torch.no_grad():
        model(_ids())


# ---------------------------------------------------------------- slow: flex and the real model


@pytest.mark.slow
def test_flex_prefill_matches_the_reference():
    model = _hf_model("llama")
    ids = _ids(T=300)
    ref = _reference_logits(model, PLAN, ids)
    with torch.no_grad():
        _close(hf.apply_plan(model, PLAN, impl="flex")(ids).logits, ref)
        assert hf.flex_works(ids.float()[..., None].expand(-1, -1, 8))  # compiled flex runs here (head dim 8)


@pytest.mark.slow
def test_smollm2_plan_matches_mixturelm_and_generates_its_tokens(tmp_path):
    ours = mixattn.load("smollm2-135m")
    mixattn.export(ours, tmp_path, format="llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    plan = Plan.uniform(30, 3, 0.5, 256, sink=16)
    plan = Plan(tuple(tuple(HeadRule(4 * h, 8.0 * (i % 3), 0.3) if (i + h) % 4 else r for h, r in enumerate(layer))
                      for i, layer in enumerate(plan.layers)))  # fmt: skip
    mixattn.apply_plan(ours, plan)
    hf.apply_plan(model, plan)
    tok = mixattn.load_tokenizer("smollm2-135m")
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 30)[:256]])
    assert ids.shape[1] == 256  # long enough for flex (>= 128) and for every rule to bite
    with torch.no_grad():
        got, want = model(ids).logits, ours(ids).logits
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    n = 16
    cache = hf.SparseCache(model, max_new_tokens=n)
    out = model.generate(ids, max_new_tokens=n, do_sample=False, past_key_values=cache, eos_token_id=None)
    assert torch.equal(out, ours.generate(ids, n))
    N = ids.shape[1] + n
    assert abs(cache.nbytes() / (2 * 30 * 3 * 64 * 4 * N) - plan.density([N])) < 1e-6
