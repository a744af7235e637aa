"""The benchmark report: how fast and how lean each nrt_kernels path is on this machine.

``python -m nrt_kernels.bench`` (or ``nrt-bench``) times forward + backward of the MixIT L1 loss
(M = 2..8 sources into 2 mixtures, both partition modes where valid) and of the V1/V2 noise-robust
losses, on the same inputs, in

* ``pytorch``: the asteroid / iSeparate-style loop of :mod:`nrt_kernels.reference`,
* ``torch.compile``: that loop compiled with inductor,
* every nrt_kernels backend that runs on the device (``triton``, ``cuda``, ``cpu``).

It writes a table to stdout, ``bench.csv`` and ``bench.png`` to ``--out``.  The modules:

* :mod:`.cases`: what is run: cases (a loss on fixed inputs, its reference and how each impl computes it), in one
  family per loss; a new op adds its family there;
* :mod:`.timing`: the timed step and its timers (CPU wall clock, do_bench, CUDA-graph replay, copy bandwidth);
* :mod:`.memory`: memory a step allocates beyond its inputs;
* :mod:`.report`: rows, the table, CSV and plot;
* :mod:`.cli`: the arguments and the run.
"""
from .cli import main

__all__ = ["main"]
