"""Model surgery: dense -> MoH, GQA -> MoA (exact), N dense specialists -> BAM mixture."""

from .bam import branch, upcycle_bam
from .moa import gqa_to_moa
from .moh import dense_to_moh

__all__ = ["branch", "dense_to_moh", "gqa_to_moa", "upcycle_bam"]
