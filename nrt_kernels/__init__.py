"""nrt_kernels: fused losses for noise-robust training of source separators.

Importing it loads no backend: triton, the C++ extension and the CUDA library are loaded when a call first uses them
(:mod:`nrt_kernels.backends`).
"""
from . import assignments, reference, training
from .assignments import MAX_CANDIDATES, MAX_SOURCES
from .backends import IMPLS
from .losses import MixITLoss, NoiseRobustLoss, PITLoss, mixit_loss, noise_robust_loss, pit_loss

__all__ = ["IMPLS", "MAX_CANDIDATES", "MAX_SOURCES", "MixITLoss", "assignments", "mixit_loss", "reference",
           "NoiseRobustLoss", "noise_robust_loss", "PITLoss", "pit_loss", "training"]
__version__ = "0.1.0"
