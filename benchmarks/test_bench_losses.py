"""pytest-benchmark: forward + backward of the V1 and V2 noise-robust losses (all terms active).

    python -m pytest benchmarks/test_bench_losses.py --benchmark-json bench-losses.json
"""
from __future__ import annotations

from conftest import bench_impls, bench_shape, run_case

from nrt_kernels.bench import cases


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "case" in metafunc.fixturenames:
        noise_robust = cases.noise_robust_cases(bench_shape(config))
        metafunc.parametrize("case", noise_robust, ids=[case.name for case in noise_robust])
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", bench_impls(config))


def test_noise_robust_fwd_bwd(benchmark, case, impl, device):
    benchmark.group = case.name
    run_case(benchmark, case, impl, device)
