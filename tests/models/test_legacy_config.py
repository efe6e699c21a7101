"""Checkpoints and configs written before ``MixtureConfig`` was grouped into sub-configs still load.

``legacy/`` was written by the code of that time (commit 13605f0): ``presets_v1.json`` holds every
preset's flat config, ``v1_checkpoint`` a small MoH/MoA + MoE model and ``v1_checkpoint_logits.pt``
its logits on fixed tokens. Loading must give the same model, not merely a model: equal configs, and logits equal up to rounding.
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
