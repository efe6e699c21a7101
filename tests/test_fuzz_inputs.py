"""Property tests of the parsers and validators on random input: each either accepts a value that is
valid, or raises ValueError (which the CLI prints as one line); nothing else escapes."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixattn.argtypes import UsageError
from mixattn.cli import build_parser
from mixattn.compress.plan import FORMAT, Plan
from mixattn.models.config import PRESETS, apply_overrides

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
rule = st.fixed_dictionaries({"sink": json_values | st.integers(-5, 100), "alpha": json_values | st.floats(-10, 1e4),
                              "beta": json_values | st.floats(-1, 2)})  # fmt: skip
near_plans = st.fixed_dictionaries(
    {"format": st.just(FORMAT) | json_values,
     "layers": st.lists(st.fixed_dictionaries({"heads": st.lists(rule, max_size=3)}) | json_values, max_size=3),
     "profile_lengths": st.lists(st.integers(-100, 10**5) | json_values, max_size=3) | json_values,
     "model": st.fixed_dictionaries({"name": json_values}) | json_values},
    optional={"meta": json_values},
)  # fmt: skip


@FAST
@given(near_plans | json_values)
def test_plan_parser_accepts_valid_plans_or_raises_value_error(data):
    try:
        plan = Plan.from_dict(json.loads(json.dumps(data)), "fuzz.json")
    except ValueError:
        return
    assert plan.num_layers >= 1 and plan.num_kv_heads >= 1
    assert all(isinstance(n, int) and n >= 1 for n in plan.profile_lengths)
    assert 0 < plan.density() <= 1
    assert Plan.from_dict(plan.to_dict()) == plan  # a parsed plan round-trips


keys = st.sampled_from(["hidden_dim", "num_heads", "num_kv_heads", "head_dim", "ffn_dim", "rope_theta", "balance",
                        "balance_coef", "moe.router.top_k", "moe.router.num_experts", "moe.router.graph", "nope",
                        "moe.nope", "attention", "tie_embeddings", "max_seq_len"])  # fmt: skip
raw = st.sampled_from(["1", "0", "-1", "2.5", "abc", "true", "null", "[1,2]", "{}", '"x"', "1e9", "NaN", ""])


@FAST
@given(st.lists(st.tuples(keys, raw), max_size=3), st.sampled_from(["tiny", "tiny-moe", "tiny-moa", "tiny-moh"]))
def test_config_overrides_give_a_valid_config_or_value_error(items, preset):
    try:
        cfg = apply_overrides(PRESETS[preset], [f"{k}={v}" for k, v in items])
    except ValueError:
        return
    assert cfg.hidden_dim >= 1 and cfg.num_heads % cfg.num_kv_heads == 0


flags = st.sampled_from([("generate", "--temperature"), ("generate", "--top-k"), ("generate", "--max-new-tokens"),
                         ("train", "--steps"), ("train", "--lr"), ("train", "--warmup-steps"), ("train", "--seed"),
                         ("eval", "--depths"), ("eval", "--lengths"), ("compress", "--density")])  # fmt: skip
values = st.text(max_size=10) | st.integers(-10**9, 10**9).map(str) | st.floats().map(str)


def _argv(cmd, flag, value):
    base = {"generate": ["generate", "m"], "train": ["train", "--out", "o"], "eval": ["eval", "m", "--out", "o"],
            "compress": ["compress", "m", "--out", "o"]}[cmd]  # fmt: skip
    extra = [] if (cmd, flag) == ("compress", "--density") else (["--density", "0.5"] if cmd == "compress" else [])
    return [*base, *extra, f"{flag}={value}"]


@FAST
@given(flags, values)
def test_cli_values_parse_to_valid_values_or_a_usage_error(flag, value):
    cmd, name = flag
    try:
        args = build_parser().parse_args(_argv(cmd, name, value))
    except UsageError:
        return
    got = getattr(args, name.lstrip("-").replace("-", "_"))
    if name in ("--temperature", "--lr", "--density"):
        assert got == got and got != float("inf") and got >= 0
    elif name in ("--depths",):
        assert all(0 <= float(x) <= 1 for x in got.split(","))
    elif name == "--lengths":
        assert all(int(x) >= 1 for x in got.split(","))
    else:
        assert isinstance(got, int) and got >= (0 if name in ("--warmup-steps", "--seed") else 1)
