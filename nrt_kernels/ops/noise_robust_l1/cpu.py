"""CPU backend of the noise-robust loss: the C++ MixIT L1 op composed with the other terms in PyTorch."""
from __future__ import annotations

from ... import backends
from .composed import Composition, composed_loss

backends.lookup("mixit_l1", "cpu")  # loads the C++ extension; raises NativeExtensionError saying how to get it
backends.register("noise_robust_l1", "cpu", Composition(composed_loss))
