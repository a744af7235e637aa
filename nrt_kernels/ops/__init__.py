"""The fused ops: per op a backend-neutral package (``<op>/__init__.py``: custom ops, fake implementations,
autograd, finishing) and one module per backend (``triton.py``, ``cpu.py``, ``cuda.py``), loaded by
:mod:`nrt_kernels.backends` when that backend first runs."""
