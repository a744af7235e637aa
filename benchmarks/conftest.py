"""pytest-benchmark suite options: which device and problem size the benchmarks run at.

    python -m pytest benchmarks --benchmark-json bench.json                  # device default size
    python -m pytest benchmarks --nrt-size quick --benchmark-json bench.json  # the CI smoke run (CPU, seconds)
"""
from __future__ import annotations

import pytest
import torch

SIZES = {
    # (batch, stems, channels, samples)
    "quick": (2, 4, 1, 1024),
    "small": (2, 4, 2, 8192),
    "sdx": (16, 4, 2, 308700),
}


def pytest_addoption(parser):
    group = parser.getgroup("nrt_kernels benchmarks")
    group.addoption("--nrt-size", default=None, choices=sorted(SIZES),
                    help="problem size: quick (CI smoke run), small (the CPU default), sdx (B=16,S=4,C=2,T=308700; "
                         "the CUDA default)")
    group.addoption("--nrt-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--nrt-compile", action="store_true",
                    help="also benchmark torch.compile of the reference (on by default on CUDA; inductor takes "
                         "seconds to minutes per case on a CPU)")


def bench_device(config) -> torch.device:
    name = config.getoption("--nrt-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_shape(config) -> tuple[int, ...]:
    size = config.getoption("--nrt-size") or ("sdx" if bench_device(config).type == "cuda" else "quick")
    return SIZES[size]


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    return bench_device(pytestconfig)


@pytest.fixture(scope="session")
def shape(pytestconfig) -> tuple[int, ...]:
    return bench_shape(pytestconfig)


def bench_impls(config) -> list[str]:
    """The reference loop, its torch.compile when asked (or on CUDA), and every backend that runs on the device."""
    from nrt_kernels.bench import cases

    device = bench_device(config)
    impls = [cases.BASELINE]
    if config.getoption("--nrt-compile") or device.type == "cuda":
        impls.append(cases.COMPILED)
    # The Triton interpreter is not benchmarked: probe_backend refuses triton on a CPU.
    impls += [impl for impl in cases.BACKENDS if cases.probe_backend(impl, device, allow_triton_on_cpu=False) is None]
    return impls


def run_case(benchmark, case, impl, device, *, rounds=None):
    """Benchmark forward + backward of ``case`` on ``impl``; check its loss against the reference first."""
    from nrt_kernels.bench import cases, timing

    if not cases.has_backend(case, impl):
        pytest.skip(f"{case.op} has no {impl} backend")
    inputs = cases.make_inputs(case, device, torch.float32)
    loss_of = cases.compiled_reference(case) if impl == cases.COMPILED else cases.loss_function(case, impl)
    expected = cases.loss_function(case, cases.BASELINE)(inputs).detach()
    got = loss_of(inputs).detach()
    # A benchmark of a wrong result is worse than none.
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-4, atol=1e-5)
    step = timing.fwd_bwd_step(loss_of, inputs)

    def synchronized_step():
        grad = step()
        timing.synchronize(device)
        return grad

    if rounds is None:
        rounds = 5 if device.type == "cpu" else 50
    grad = benchmark.pedantic(synchronized_step, rounds=rounds, warmup_rounds=2, iterations=1)
    assert torch.isfinite(grad).all()
    nbytes = cases.min_bytes(inputs)
    benchmark.extra_info.update({"case": case.name, "impl": impl, "shape": list(case.shape), "min_bytes": nbytes,
                                 "device": str(device)})
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["gbps"] = nbytes / stats.stats.median / 1e9
