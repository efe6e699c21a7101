"""Checkpoints and configs written before ``MixtureConfig`` was grouped into sub-configs still load.

``legacy/`` was written by the code of that time (commit 13605f0): ``presets_v1.json`` holds every
preset's flat config, ``v1_checkpoint`` a small MoH/MoA + MoE model and ``v1_checkpoint_logits.pt``
its logits on fixed tokens. Loading must give the same model, not merely a model: equal configs, and logits equal up to rounding.
``presets_v2.json`` holds every preset's config in the grouped layout as written before the expert
kernel moved from ``moe.impl`` / ``moa.impl`` into ``MixtureConfig.kernels`` (commit 13a2071).
"""

import json
from pathlib import Path

import pytest
import torch

import mixattn
from mixattn.models.config import PRESETS, MixtureConfig

from ..conftest import assert_fp_close

LEGACY = Path(__file__).parent / "legacy"


@pytest.mark.parametrize("name", sorted(json.loads((LEGACY / "presets_v1.json").read_text())))
def test_every_old_preset_config_loads_as_the_same_preset(name):
    old = json.loads((LEGACY / "presets_v1.json").read_text())[name]
    assert MixtureConfig.from_dict(old) == PRESETS[name]


@pytest.mark.parametrize("name", sorted(json.loads((LEGACY / "presets_v2.json").read_text())))
def test_every_grouped_layout_preset_with_expert_impl_loads_as_the_same_preset(name):
    old = json.loads((LEGACY / "presets_v2.json").read_text())[name]
    assert "impl" in old["layers"]["moe"]  # the fixture is the layout it claims to be
    assert MixtureConfig.from_dict(old) == PRESETS[name]


@pytest.mark.parametrize("flat", [False, True], ids=["grouped", "flat"])
def test_an_old_expert_impl_becomes_the_models_grouped_linear_kernel(flat):
    data = PRESETS["tiny-moa-moe"].to_dict()
    moe, moa = ({**data["layers"][k], "impl": "reference"} for k in ("moe", "moa"))
    if flat:  # the first layout: layer kinds at the top level
        data = {k: v for k, v in data.items() if k != "layers"} | {**data["layers"], "moe": moe, "moa": moa}
    else:
        data["layers"] |= {"moe": moe, "moa": moa}
    cfg = MixtureConfig.from_dict(data)
    assert cfg.kernels == {"grouped_linear": "reference"}
    assert cfg.evolve(kernels={}) == PRESETS["tiny-moa-moe"]


def test_old_expert_impls_that_disagree_are_refused_by_name():
    data = PRESETS["tiny-moa-moe"].to_dict()
    data["layers"]["moe"]["impl"], data["layers"]["moa"]["impl"] = "reference", "grouped"
    with pytest.raises(ValueError, match="kernels.grouped_linear"):
        MixtureConfig.from_dict(data)
    data["kernels"] = {"grouped_linear": "grouped"}  # still two choices in the old fields: refused
    with pytest.raises(ValueError, match="different grouped_linear kernels"):
        MixtureConfig.from_dict(data)


def test_an_old_checkpoint_loads_with_the_same_logits():
    model = mixattn.load(LEGACY / "v1_checkpoint").eval()
    ref = torch.load(LEGACY / "v1_checkpoint_logits.pt")
    with torch.no_grad():
        logits = model(ref["ids"]).logits
    # the same weights and math; only the summation order may differ (threads): rounding tolerance
    assert_fp_close(logits, ref["logits"], terms=model.cfg.hidden_dim, chain=2 * model.cfg.num_layers)


def test_the_current_layout_round_trips():
    for cfg in PRESETS.values():
        assert MixtureConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
