"""pytest-benchmark: forward + backward of the V1 and V2 noise-robust losses (all terms active).

    python -m pytest benchmarks/test_bench_losses.py --benchmark-json bench-losses.json
"""
from __future__ import annotations

from conftest import bench_impls, bench_shape, run_case

from nrt_kernels import bench


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "case" in metafunc.fixturenames:
        shape = bench_shape(config)
        metafunc.parametrize("case", [bench.Case("v1", "v1", shape), bench.Case("v2", "v2", shape)],
                             ids=["v1", "v2"])
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", bench_impls(config))


def test_noise_robust_fwd_bwd(benchmark, case, impl, device):
    benchmark.group = case.name
    run_case(benchmark, case, impl, device)
