import dataclasses

import pytest
import torch

import mixattn
from mixattn.models import PRESETS, MixtureConfig, MixtureLM, count_parameters, from_name
from tests.conftest import assert_fp_close, grads

TINY = [n for n in PRESETS if n.startswith("tiny")]


@pytest.mark.parametrize("name", list(PRESETS))
def test_forward_backward_every_preset(name):
    cfg = PRESETS[name]
    if name.startswith("small"):  # same code paths as tiny; keep CI fast with 1 layer
        cfg = cfg.evolve(num_layers=1)
    model = MixtureLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(ids)
    assert out.logits.shape == (2, 9, cfg.vocab_size)
    loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # routers of unused-by-construction paths aside, every parameter must receive a gradient
    assert not missing, missing
    assert (out.aux_loss > 0) == any(k in name for k in ("moh", "moa", "moe", "bam"))


@pytest.mark.parametrize("name", TINY)
def test_cached_generation_equals_uncached(name):
    model = MixtureLM(PRESETS[name])
    for p in model.parameters():  # sharper routing than the zero-init MoH routers
        if p.dim() == 2 and p.shape[0] <= 8:
            torch.nn.init.normal_(p)
    prompt = torch.randint(0, 256, (2, 7))
    a = model.generate(prompt, 12, use_cache=True)
    b = model.generate(prompt, 12, use_cache=False)
    assert torch.equal(a, b)


def test_generate_sampling_is_seeded_and_stops():
    model = MixtureLM(PRESETS["tiny"])
    prompt = torch.randint(0, 256, (1, 5))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = model.generate(prompt, 10, temperature=1.0, top_k=20, generator=g())
    b = model.generate(prompt, 10, temperature=1.0, top_k=20, generator=g())
    assert torch.equal(a, b)
    first = int(model.generate(prompt, 1)[0, -1])
    stopped = model.generate(prompt, 10, stop_tokens=(first,))
    assert stopped.shape[1] == 6


def test_graph_routers_in_a_model_decode_with_cache():
    base = PRESETS["tiny-moe"]
    for graph in ("similarity", "attention"):
        router = dataclasses.replace(base.moe.router, graph=graph, select_on="probs")
        cfg = base.evolve(moe=dataclasses.replace(base.moe, router=router))
        model = MixtureLM(cfg)
        prompt = torch.randint(0, 256, (1, 6))
        assert torch.equal(model.generate(prompt, 8), model.generate(prompt, 8, use_cache=False))


def test_config_json_round_trip_and_errors():
    cfg = PRESETS["small-moa-moe"].evolve(attention=("moa",) * 5 + ("dense",))
    assert MixtureConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="config.layers.moe.router.nope"):
        d = cfg.to_dict()
        d["layers"]["moe"]["router"]["nope"] = 1
        MixtureConfig.from_dict(d)
    with pytest.raises(ValueError, match="lists 2 layers"):
        cfg.evolve(attention=("moa", "moa"))
    with pytest.raises(ValueError, match="attention='mla'"):
        cfg.evolve(attention="mla")
    with pytest.raises(ValueError, match="tiny-moh"):
        from_name("nope")


def test_bad_input_ids():
    model = MixtureLM(PRESETS["tiny"])
    with pytest.raises(ValueError, match="integers"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[300]]))


def test_parallel_block_and_active_parameters():
    model = MixtureLM(PRESETS["tiny-bam"])
    assert model.layers[0].ffn_norm is None
    total, active = count_parameters(MixtureLM(PRESETS["tiny-moe"]))
    assert active < total
    total, active = count_parameters(MixtureLM(PRESETS["tiny"]))
    assert active == total


def test_one_expert_moe_model_equals_dense_model():
    dense = MixtureLM(PRESETS["tiny"])
    base = PRESETS["tiny-moe"]
    from mixattn.layers import RouterConfig

    cfg = base.evolve(
        moe=dataclasses.replace(base.moe, router=RouterConfig(num_experts=1, top_k=1), expert_ffn_dim=128)
    )
    moe = MixtureLM(cfg)
    sd = {k: v for k, v in dense.state_dict().items() if ".ffn." not in k}
    moe.load_state_dict(sd, strict=False)
    with torch.no_grad():
        for ld, lm in zip(dense.layers, moe.layers):
            lm.ffn.input_linear.weight[0] = torch.cat([ld.ffn.gate_proj.weight, ld.ffn.up_proj.weight])
            lm.ffn.output_linear.weight[0] = ld.ffn.down_proj.weight
    ids = torch.randint(0, 256, (2, 11))
    a, b = moe(ids).logits, dense(ids).logits
    terms = max(cfg.hidden_dim, cfg.moe.expert_ffn_dim, cfg.vocab_size)  # the longest reduction
    assert_fp_close(a, b, terms, chain=cfg.num_layers * 2)
    emb = [moe.embed.weight]
    assert_fp_close(grads(a, emb)[0], grads(b, [dense.embed.weight])[0], terms, chain=cfg.num_layers * 4)


# ------------------------------------------------------------------ left-padded batches


def _graph_moe(graph: str) -> MixtureConfig:
    base = PRESETS["tiny-moe"]
    router = dataclasses.replace(base.moe.router, graph=graph, select_on="probs")
    return base.evolve(moe=dataclasses.replace(base.moe, router=router))


LEFT_PAD_MODELS = {name: PRESETS[name] for name in ("tiny", "tiny-moa", "tiny-moh", "tiny-moe", "tiny-bam")}
LEFT_PAD_MODELS |= {f"moe-graph-{g}": _graph_moe(g) for g in ("similarity", "attention")}


@pytest.mark.parametrize("name", LEFT_PAD_MODELS)
@pytest.mark.parametrize("plan", [False, True])
def test_left_padded_batch_matches_each_prompt_alone(name, plan):
    """RoPE is relative and padded keys are masked, so a left-padded row equals its prompt alone:
    logits of every real token, and greedy generation with the dense or the ragged cache."""
    from mixattn.compress import HeadRule, Plan, apply_plan

    cfg = LEFT_PAD_MODELS[name]
    model = MixtureLM(cfg).eval()
    if plan and ("bam" in name or name == "moe-graph-attention"):
        with pytest.raises(ValueError, match="KV cache per expert|attention graph"):
            apply_plan(model, Plan.dense(cfg.num_layers, cfg.num_kv_heads))
        assert all(getattr(layer.attn, "sparse", None) is None for layer in model.layers)  # nothing half-applied
        return
    if plan:  # beta = 0, so spans do not depend on N (which differs between the batch and a row alone)
        rules = (HeadRule(2, 4.0, 0.0), HeadRule(0, 5.0, 0.0))  # sink 2 + window 4; window 5
        apply_plan(model, Plan(tuple(rules[: cfg.num_kv_heads] for _ in range(cfg.num_layers))))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (11, 4, 8)]
    ids, pad = mixattn.pad_left(prompts)
    with torch.no_grad():
        batch = model(ids, left_pad=pad).logits
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p])).logits[0]
            torch.testing.assert_close(batch[b, int(pad[b]) :], alone, atol=1e-4, rtol=1e-4)
    out = model.generate(ids, 12, left_pad=pad)
    assert torch.equal(out, model.generate(ids, 12, left_pad=pad, use_cache=False))
    for b, p in enumerate(prompts):
        assert out[b, ids.shape[1] :].tolist() == model.generate(torch.tensor([p]), 12)[0, len(p) :].tolist()


def test_left_pad_errors():
    model = MixtureLM(PRESETS["tiny"])
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model(ids, left_pad=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        model(ids, left_pad=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="no empty prompt"):
        mixattn.pad_left([[1, 2], []])


@pytest.mark.parametrize("name", ["tiny", "tiny-moh", "tiny-moe", "tiny-moa"])
def test_float64_model_agrees_with_float32(name):
    """Routers compute in at least fp32: a float64 model stays float64 end to end (no fp32 cast in
    between) and agrees with the fp32 model up to fp32 rounding."""
    model = MixtureLM(PRESETS[name]).eval()
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
        got = model.double()(ids).logits
    assert got.dtype == torch.float64
    assert_fp_close(got.float(), want, terms=256, chain=2 * model.cfg.num_layers)
