"""Dense attention -> Mixture-of-Head attention, MoH-LLaMA3 recipe (arXiv 2410.11842 §4.4, App. B.4).

The first half of the heads are shared; the rest are routed by a parameter-free router scoring
each head by the L2 norm of its query (before RoPE), normalised per token, softmax, top-k; gates
are binary with a straight-through estimator; balance coefficient 0.01. No parameter is added, so
with every routed head active the converted model computes exactly the dense function.
"""

from __future__ import annotations

from ..layers.moh import MoHConfig
from ..models.decoder import MixtureLM
from .common import require_dense


def dense_to_moh(model: MixtureLM, active_fraction: float = 0.75, shared_fraction: float = 0.5) -> MixtureLM:
    """Return a new MoH model with round(H * active_fraction) active heads per token."""
    cfg = model.cfg
    require_dense(cfg, "dense -> MoH")
    H = cfg.num_heads
    shared = int(H * shared_fraction)
    top_k = round(H * active_fraction) - shared
    if not 1 <= top_k <= H - shared:
        raise ValueError(
            f"active_fraction={active_fraction} with {shared} shared of {H} heads leaves top_k={top_k}; "
            f"it must give between {shared + 1} and {H} active heads"
        )
    moh = MoHConfig(shared_heads=shared, top_k=top_k, scoring="query_norm")
    new = MixtureLM(cfg.evolve(attention="moh", moh=moh, balance_coef=0.01))
    new.load_state_dict(model.state_dict())  # same parameter names; the router has none
    return new
