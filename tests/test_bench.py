"""The report CLI (nrt_kernels.bench): it runs end to end on tiny shapes and what it writes adds up."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nrt_kernels import bench

ROOT = Path(__file__).resolve().parent.parent


def run_cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The bench must not depend on the Triton interpreter the test suite turns on.
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "nrt_kernels.bench", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_table_csv_and_png(tmp_path):
    cases = ["mixit-2-generalized", "mixit-4-equal", "v1", "v2"]
    result = run_cli(tmp_path, "--device", "cpu", "--shape", "2,4,1,256", "--impl", "pytorch",
                     "--cases", ",".join(cases), "--repeats", "2", "--warmup", "1", "--budget-s", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout
    assert "device: cpu" in stdout and f"torch {torch.__version__}" in stdout
    assert "copy bandwidth:" in stdout and "columns:" in stdout
    table = [line.split() for line in stdout.splitlines() if line.split()[:1] and line.split()[0] in cases]
    assert [cells[0] for cells in table] == cases
    assert all(cells[1] == "pytorch" and float(cells[2]) > 0 and cells[3] == "1.0x" for cells in table)

    with open(tmp_path / "bench.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case"] for row in rows] == cases
    for row in rows:
        assert row["device"] == "cpu" and row["impl"] == "pytorch" and row["note"] == ""
        ms, gbps, copy_gbps = float(row["ms"]), float(row["gbps"]), float(row["copy_gbps"])
        assert 0 < ms < 10_000 and copy_gbps > 0
        assert float(row["speedup"]) == 1.0
        # The baseline materialises every candidate's remix: it must show memory beyond the grad it returns.
        assert float(row["extra_bytes"]) > 0
        assert gbps == pytest.approx(int(row["min_bytes"]) / (ms * 1e-3) / 1e9, rel=1e-4)
        assert float(row["copy_fraction"]) == pytest.approx(gbps / copy_gbps, rel=1e-4)
    # Minimal bytes, counted by hand: float32, est (2, M, 1, 256) against 2 mixtures (2, 2, 1, 256).
    element = 4 * 2 * 256
    assert int(rows[0]["min_bytes"]) == 2 * (2 * element + 2 * element) + 2 * element
    assert int(rows[1]["min_bytes"]) == 2 * (4 * element + 2 * element) + 4 * element
    # est, targets and teacher targets (2, 4, 1, 256) read twice, grad est written once.
    assert int(rows[2]["min_bytes"]) == int(rows[3]["min_bytes"]) == 2 * (3 * 4 * element) + 4 * element

    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_rejects_unknown_case_shape_and_impl(tmp_path):
    for flags, message in ((["--cases", "no-such-case"], "no case matches"), (["--shape", "2,4,1"], "--shape"),
                           (["--impl", "numpy"], "unknown --impl")):
        with pytest.raises(SystemExit, match=message):
            bench.main(["--device", "cpu", "--out", str(tmp_path), *flags])


def test_peak_bytes_cpu_sees_a_known_allocation():
    def step():
        scratch = torch.ones(1 << 20)  # 4 MiB, freed when step returns
        return scratch.sum()

    peak = bench.peak_bytes_cpu(step)
    assert 4 << 20 <= peak < (4 << 20) + (64 << 10)


def test_copy_bandwidth_and_timer_are_sane():
    assert 0.1 < bench.copy_bandwidth(torch.device("cpu"), quick=True) < 10_000
    ms = bench.time_cpu(lambda: torch.ones(10).sum(), warmup=1, min_repeats=3, budget_s=0.0)
    assert 0 < ms < 1000


def test_cases_cover_both_partition_modes():
    names = [case.name for case in bench.build_cases((2, 4, 1, 64))]
    assert "mixit-2-generalized" in names and "mixit-8-equal" in names and "mixit-3-equal" not in names
    assert sum(name.startswith("mixit-") for name in names) == 7 + 4 and names[-2:] == ["v1", "v2"]
    assert [case.name for case in bench.select_cases(bench.build_cases((2, 4, 1, 64)), "mixit-4-*")] == \
        ["mixit-4-generalized", "mixit-4-equal"]


def test_triton_is_not_benchmarked_on_a_cpu_unless_named():
    reason = bench.probe_backend("triton", torch.device("cpu"), allow_triton_on_cpu=False)
    assert reason is not None and "GPU" in reason
    assert bench.parse_shape("sdx", torch.device("cpu")) == (16, 4, 2, 308700)
    assert bench.parse_shape("auto", torch.device("cpu")) == bench.SHAPES["small"]
