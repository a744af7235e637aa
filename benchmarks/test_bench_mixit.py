"""pytest-benchmark: forward + backward of the MixIT L1 loss, reference loop vs every backend here.

    python -m pytest benchmarks/test_bench_mixit.py --benchmark-json bench-mixit.json
"""
from __future__ import annotations

from conftest import bench_impls, bench_shape, run_case

from nrt_kernels.bench import cases

MIXIT_CASES = ("mixit-2-generalized", "mixit-4-generalized", "mixit-4-equal", "mixit-6-generalized",
               "mixit-8-generalized", "mixit-8-equal")


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "case" in metafunc.fixturenames:
        by_name = {case.name: case for case in cases.mixit_cases(bench_shape(config))}
        metafunc.parametrize("case", [by_name[name] for name in MIXIT_CASES], ids=list(MIXIT_CASES))
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", bench_impls(config))


def test_mixit_fwd_bwd(benchmark, case, impl, device):
    benchmark.group = case.name
    run_case(benchmark, case, impl, device)
