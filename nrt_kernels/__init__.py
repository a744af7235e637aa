"""nrt_kernels: fused losses for noise-robust training of source separators."""
from . import assignments, reference
from .assignments import MAX_CANDIDATES, MAX_SOURCES
from .dispatch import IMPLS
from .losses import MixITLoss, mixit_loss

__all__ = ["IMPLS", "MAX_CANDIDATES", "MAX_SOURCES", "MixITLoss", "assignments", "mixit_loss", "reference"]
__version__ = "0.1.0"
