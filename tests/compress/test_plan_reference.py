"""Plan files and baseline rules against hard-coded expected values: the JSON layout, the defaults
of a minimal plan file, and the rules the uniform, layerwise and DuoAttention baselines choose."""

import pytest

from mixattn.compress.plan import DENSE, FORMAT, HeadRule, Plan


def test_to_dict_is_the_documented_layout():
    plan = Plan(((HeadRule(4, 16.0, 0.25), DENSE),), "m", (100, 300), {"method": "x"})
    # density: mean over the 2 heads and 2 lengths of kept / N, kept = min(N, sink + span):
    # head 0: span(100) = 41, kept 45; span(300) = 91, kept 95; head 1 dense
    density = (45 / 100 + 95 / 300 + 1 + 1) / 4
    assert plan.to_dict() == {
        "format": FORMAT,
        "model": {"name": "m", "num_layers": 1, "num_kv_heads": 2},
        "density": round(density, 6),
        "profile_lengths": [100, 300],
        "layers": [{"heads": [{"sink": 4, "alpha": 16.0, "beta": 0.25}, {"sink": 0, "alpha": 0.0, "beta": 1.0}]}],
        "meta": {"method": "x"},
    }
    assert plan.to_dict()["density"] != round(density, 2)  # six places kept, not two


def test_a_minimal_plan_file_takes_the_defaults():
    plan = Plan.from_dict({"format": FORMAT, "layers": [{"heads": [{"sink": 1, "alpha": 2.0, "beta": 0.5}]}]})
    assert plan.profile_lengths == (1024, 2048, 4096)
    assert plan.model_name == "" and plan.meta == {}
    assert plan.layers == ((HeadRule(1, 2.0, 0.5),),)


@pytest.mark.parametrize(
    "density, length, rule",
    [
        (0.5, 1024, HeadRule(64, 0.0, 0.4375)),  # sink 64, beta = 0.5 - 64 / 1024
        (0.02, 1000, HeadRule(19, 0.0, 0.001)),  # 20 keys in all: the sink shrinks to 20 - 1, one key of window
        (0.001, 1000, HeadRule(0, 0.0, 0.001)),  # one key: no sink
        (1.0, 1000, DENSE),
    ],
)
def test_uniform_rule_for_a_density(density, length, rule):
    plan = Plan.uniform(2, 3, density, length)
    assert plan.layers == ((rule,) * 3,) * 2 and plan.meta == {"method": "uniform"}
    assert rule.kept(length) == round(density * length)  # the rule keeps exactly the asked share


def test_layerwise_rules_and_meta():
    plan = Plan.layerwise([0.5, 0.25], 2, 1024)
    assert plan.layers == ((HeadRule(64, 0.0, 0.4375),) * 2, (HeadRule(64, 0.0, 0.1875),) * 2)
    assert plan.meta == {"method": "layerwise"}


def test_duo_makes_the_top_scored_heads_full():
    scores = [[0.9, 0.1], [0.5, 0.7]]
    # streaming heads: sink 64 + window 256 at 1024 keep 320 keys (0.3125); density 0.65 leaves room for
    # round(4 * (0.65 - 0.3125) / (1 - 0.3125)) = 2 full heads: the two highest scores
    plan = Plan.duo(scores, 0.65, 1024)
    stream = HeadRule(64, 256.0, 0.0)
    assert plan.layers == ((DENSE, stream), (stream, DENSE))
    assert plan.meta == {"method": "duo", "retrieval_heads": 2}
    assert Plan.duo(scores, 0.3, 1024).layers == ((stream, stream), (stream, stream))  # below a streaming head


@pytest.mark.parametrize("lengths", [(0,), (1024, 0), (1.5,), (True,), ()])
def test_profile_lengths_must_be_positive_integers(lengths):
    with pytest.raises(ValueError, match="profile_lengths must be a non-empty list of integers >= 1"):
        Plan(((DENSE,),), profile_lengths=lengths)


def test_summary_reports_the_asked_lengths():
    plan = Plan(((HeadRule(0, 10.0, 0.0),),), profile_lengths=(1000,))  # span 10: density 10 / N
    text = plan.summary([100, 200])
    assert text.splitlines()[0] == "plan for a model: 1 layers x 1 KV heads"
    assert "density: 0.100 @ 100, 0.050 @ 200 (mean 0.075)" in text  # not the profile length's 0.010
    assert "span     10  density 0.050" in text
