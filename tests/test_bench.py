"""The report (nrt_kernels.bench): the CLI runs end to end on tiny shapes, what it writes adds up, and every bad
argument is a one-line error."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nrt_kernels import bench
from nrt_kernels.bench import cases, cli, memory, timing

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


def test_peak_bytes_cpu_sees_a_known_allocation():
    def step():
        scratch = torch.ones(1 << 20)  # 4 MiB, freed when step returns
        return scratch.sum()

    peak = memory.peak_bytes_cpu(step)
    assert 4 << 20 <= peak < (4 << 20) + (64 << 10)


def test_copy_bandwidth_and_timer_are_sane():
    assert 0.1 < timing.copy_bandwidth(torch.device("cpu"), quick=True) < 10_000
    ms = timing.time_cpu(lambda: torch.ones(10).sum(), warmup=1, min_repeats=3, budget_s=0.0)
    assert 0 < ms < 1000


def test_cases_cover_both_partition_modes():
    names = [case.name for case in cases.build_cases((2, 4, 1, 64))]
    assert "mixit-2-generalized" in names and "mixit-8-equal" in names and "mixit-3-equal" not in names
    assert sum(name.startswith("mixit-") for name in names) == 7 + 4 and {"v1", "v2"} <= set(names)
    assert [case.name for case in cases.select_cases(cases.build_cases((2, 4, 1, 64)), "mixit-4-*")] == \
        ["mixit-4-generalized", "mixit-4-equal"]


def test_triton_is_not_benchmarked_on_a_cpu_unless_named():
    reason = cases.probe_backend("triton", torch.device("cpu"), allow_triton_on_cpu=False)
    assert reason is not None and "GPU" in reason
    assert cli.parse_shape("sdx", torch.device("cpu")) == (16, 4, 2, 308700)
    assert cli.parse_shape("auto", torch.device("cpu")) == cases.SHAPES["small"]


# Each bad argument is one argparse-style line on stderr (exit status 2), never a traceback or a report.
# The trailing flags keep a run that wrongly goes ahead to a second.
TINY = ["--quick", "--shape", "tiny", "--impl", "pytorch", "--cases", "mixit-2-generalized"]


@pytest.mark.parametrize("flags,message", [
    pytest.param(["--device", "cuda"], "CUDA is not available", id="cuda-without-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    pytest.param(["--device", "foo"], "--device", id="unknown-device"),
    pytest.param(["--device", "meta"], "--device meta", id="meta-device"),
    pytest.param(["--threads", "-1"], "--threads", id="negative-threads"),
    pytest.param(["--threads", "0"], "--threads", id="zero-threads"),
    pytest.param(["--repeats", "0", "--budget-s", "0"], "--repeats", id="no-timed-calls"),
    pytest.param(["--budget-s", "-1"], "--budget-s", id="negative-budget"),
    pytest.param(["--cases", "no-such-case"], "no case matches", id="unknown-case"),
    pytest.param(["--shape", "2,4,1"], "--shape", id="bad-shape"),
    pytest.param(["--impl", "numpy"], "unknown --impl", id="unknown-impl"),
])
def test_cli_bad_arguments_are_one_line_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(tmp_path / "out"), *TINY, *flags])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    assert out == "" and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m nrt_kernels.bench: error: ") and message in last, err
    assert not (tmp_path / "out").exists()


def test_cli_out_naming_a_file_is_a_one_line_error(tmp_path, capsys):
    a_file = tmp_path / "report.txt"
    a_file.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(a_file), *TINY])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("python -m nrt_kernels.bench: error: --out") and "file" in err
    assert a_file.read_text() == "not a folder"


def test_cli_runs_without_tqdm(tmp_path, capsys, monkeypatch):
    # The progress bar comes with the [bench] extra; without it the report runs without a bar and says how to get one.
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` raises ImportError
    assert bench.main(["--out", str(tmp_path), "--device", "cpu", *TINY, "--repeats", "1", "--warmup", "0"]) == 0
    out, err = capsys.readouterr()
    assert "mixit-2-generalized" in out and "pip install tqdm" in err
    assert (tmp_path / "bench.csv").exists()
