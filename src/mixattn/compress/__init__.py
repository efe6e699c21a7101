"""Long-context compression: per-KV-head sparse attention plans (sink + elastic sliding window)."""

from .apply import apply_plan, remove_plan
from .plan import DENSE, FORMAT, HeadRule, Plan

__all__ = ["DENSE", "FORMAT", "HeadRule", "Plan", "apply_plan", "remove_plan"]
