"""``python -m nrt_kernels.bench`` / ``nrt-bench``: parse and check the arguments, run every (case, impl) row, write the
report.  Every bad argument is one argparse error line (exit status 2) before anything is measured or written."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch

from .cases import (BASELINE, BACKENDS, COMPILED, FAMILIES, IMPL_CHOICES, SHAPES, Case, available_impls,
                    build_cases, compiled_reference, has_backend, loss_function, make_inputs, min_bytes,
                    quick_patterns, select_cases, unknown_impls)
from .memory import peak_bytes_cpu, peak_bytes_cuda
from .report import Row, columns_footer, environment, fill_speedups, format_table, plot, write_csv
from .timing import copy_bandwidth, fwd_bwd_step, synchronize, time_cpu, time_cuda, time_cuda_graph

PROG = "python -m nrt_kernels.bench"


def measure(case: Case, impl: str, device: torch.device, dtype: torch.dtype, args, copy_gbps: float) -> Row:
    """One row: forward + backward of ``case`` on ``impl``, timed, its memory counted; an error becomes its note."""
    row = Row(case.name, impl)
    inputs = make_inputs(case, device, dtype, seed=args.seed)
    row.min_bytes = min_bytes(inputs)
    if not has_backend(case, impl):
        row.note = f"skipped: {case.op} has no {impl} backend"
        return row
    if impl == COMPILED and case.candidates > args.compile_max_candidates:
        row.note = f"skipped: {case.candidates} candidates > --compile-max-candidates {args.compile_max_candidates}"
        return row
    if impl == BASELINE and case.candidates > args.loop_max_candidates:
        row.note = f"skipped: {case.candidates} candidates > --loop-max-candidates {args.loop_max_candidates}"
        return row
    try:
        loss_of = compiled_reference(case) if impl == COMPILED else loss_function(case, impl)
        step = fwd_bwd_step(loss_of, inputs)
        begin = time.perf_counter()
        step()
        synchronize(device)
        if impl == COMPILED:
            row.compile_s = time.perf_counter() - begin
        if device.type == "cuda":
            row.ms = time_cuda(step, rep_ms=args.rep_ms)
            row.extra_bytes = peak_bytes_cuda(step, device)
            if not args.no_graph:
                try:
                    row.graph_ms = time_cuda_graph(step, rep_ms=args.rep_ms)
                except Exception as error:  # noqa: BLE001 - a path that cannot be captured still gets its eager time
                    # The reference loop indexes with Python lists: host-to-device copies, refused while capturing.
                    message = str(error).splitlines()[0][:60] if str(error) else ""
                    row.note = f"no graph: {type(error).__name__}: {message}"
        else:
            row.ms = time_cpu(step, warmup=args.warmup, min_repeats=args.repeats, budget_s=args.budget_s)
            row.extra_bytes = peak_bytes_cpu(step)
        # grad est has to be written by every impl: what is left is the impl's own workspace.
        est = inputs["est"]
        row.extra_bytes -= est.numel() * est.element_size()
    except Exception as error:  # noqa: BLE001 - one failing path must not end the report
        row.note = f"error: {type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"
        return row
    best_ms = row.ms if math.isnan(row.graph_ms) else min(row.ms, row.graph_ms)
    row.gbps = row.min_bytes / (best_ms * 1e-3) / 1e9
    row.copy_fraction = row.gbps / copy_gbps
    if impl == COMPILED and not row.note:
        row.note = f"first call (compile) {row.compile_s:.1f} s"
    return row


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


def _integer(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def parse_shape(text: str, device: torch.device) -> tuple[int, ...]:
    """``--shape``: a name of :data:`SHAPES` ("auto": sdx on CUDA, small on a CPU) or B,S,C,T; ValueError if not."""
    if text == "auto":
        text = "sdx" if device.type == "cuda" else "small"
    if text in SHAPES:
        return SHAPES[text]
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"--shape must be one of {sorted(SHAPES)} or B,S,C,T (four positive ints), got {text!r}")
    return shape


def parse_device(text: str) -> torch.device:
    """``--device``: auto, cpu, cuda or cuda:N, where it can run; ValueError saying why not."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text}: the report times cpu and cuda devices only (a {device.type} tensor has no "
                         "kernels of its own to time)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device found"
            raise ValueError(f"--device {text}: CUDA is not available here (torch {torch.__version__}, {build}); use "
                             "--device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Time forward+backward of the MixIT L1, V1 and V2 losses: the asteroid/iSeparate-style PyTorch "
                    "loop, torch.compile of it, and every nrt_kernels backend that runs here. Writes a table, "
                    "bench.csv and bench.png.")
    parser.add_argument("--out", default="bench-out", help="output folder, created if missing (default: ./bench-out)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--shape", default="auto",
                        help="small (B=2,S=4,C=2,T=8192: the CPU default), sdx (B=16,S=4,C=2,T=308700: the CUDA "
                             "default), tiny, or B,S,C,T; MixIT cases keep B, C, T and vary the sources")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--impl", default=None,
                        help=f"comma list of {BASELINE}, compile, {', '.join(BACKENDS)} (default: all that run "
                             "here; triton on a CPU only when named)")
    parser.add_argument("--cases", default=None,
                        help="comma list of case names or globs, e.g. 'mixit-4-*,v1' (default: all)")
    parser.add_argument("--max-sources", type=_integer(1), default=8,
                        help="largest M of the MixIT cases (default 8; the L1 stops at 12, SI-SDR / log-MSE at 16)")
    parser.add_argument("--loop-max-candidates", type=_integer(0), default=256,
                        help="time the reference loop only on cases with at most this many candidate assignments "
                             "(default 256, M = 8: each costs a remix per candidate, minutes per step at M = 12-16)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: cases {quick_patterns().replace(',', ', ')}, fewer repeats")
    parser.add_argument("--compile-max-candidates", type=_integer(0), default=None,
                        help="compile only cases with at most this many candidate assignments (default: 16 on a "
                             "CPU, where inductor takes seconds to minutes per case; 64 on CUDA, where M = 7, 8 "
                             "take minutes)")
    parser.add_argument("--repeats", type=_integer(1), default=None,
                        help="CPU: at least this many timed calls (default 5)")
    parser.add_argument("--warmup", type=_integer(0), default=2, help="CPU: untimed calls first (default 2)")
    parser.add_argument("--budget-s", type=_seconds, default=None,
                        help="CPU: timing budget per row, s (default 0.5)")
    parser.add_argument("--rep-ms", type=_integer(1), default=100,
                        help="CUDA: do_bench rep time per row, ms (default 100)")
    parser.add_argument("--no-graph", action="store_true", help="CUDA: skip the CUDA-graph replay timing")
    parser.add_argument("--threads", type=_integer(1), default=None,
                        help="CPU: torch threads (default: torch's, or 1 when the load average shows other "
                             "processes on the cores, since a stalled thread holds up a whole parallel region)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _progress(tasks: list):
    """``tasks`` with a progress bar on stderr when tqdm (the [bench] extra) is installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        print("(no progress bar: pip install tqdm, or install nrt_kernels[bench])", file=sys.stderr)
        yield from tasks
        return
    with tqdm(tasks, desc="bench", unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
        for case, impl in bar:
            bar.set_postfix_str(f"{case.name} / {impl}")
            yield case, impl


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = parse_device(args.device)
        shape = parse_shape(args.shape, device)
    except ValueError as error:
        parser.error(str(error))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a file; name a folder (it is created if missing)")
    cases = select_cases(build_cases(shape, max_sources=args.max_sources),
                         args.cases or (quick_patterns() if args.quick else None))
    if not cases:
        names = "; ".join(family.names for family in FAMILIES)
        parser.error(f"no case matches --cases {args.cases!r}; cases are {names}")
    requested = [name.strip() for name in args.impl.split(",")] if args.impl else None
    unknown = unknown_impls(requested or [])
    if unknown:
        parser.error(f"unknown --impl {unknown}; choose from {list(IMPL_CHOICES)}")

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    load_note = ""
    busy = device.type == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    if args.threads:
        torch.set_num_threads(args.threads)
        if busy and args.threads > 1:
            load_note = ": other processes compete for the cores, expect noisy timings (--threads 1 steadies them)"
    elif busy and torch.get_num_threads() > 1:
        # Other processes hold the cores: a parallel region waits for its slowest thread, so multi-threaded
        # timings swing by 10-100x; one thread gives steady numbers.
        torch.set_num_threads(1)
        load_note = ": other processes compete for the cores, so this run times 1 thread (--threads N to override)"
    dtype = getattr(torch, args.dtype)
    if args.compile_max_candidates is None:
        args.compile_max_candidates = 64 if device.type == "cuda" else 16
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.budget_s is None:
        args.budget_s = 0.15 if args.quick else 0.5
    if args.quick:
        args.rep_ms = min(args.rep_ms, 30)
    # The reference reads lru_cache'd assignment tables; they are constants, which is what dynamo assumes.
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
    # Every compiled case is a new graph of the same code: keep dynamo from falling back to eager.
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 256)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {args.out}: cannot create the folder ({error.strerror})")
    impls, skipped = available_impls(requested, device)

    env = environment(device)
    print(f"nrt_kernels {env['nrt_kernels']} benchmark report, {env['date']}")
    threads = f", {env['threads']} thread{'s' if env['threads'] != 1 else ''}" if device.type == "cpu" else ""
    print(f"device: {device} ({env['device_name']}{threads}); torch {env['torch']}, triton {env['triton']}, "
          f"python {env['python']}")
    batch, stems, channels, length = shape
    print(f"shape: B={batch}, C={channels}, T={length}, {args.dtype}; MixIT cases: est (B, M, C, T) vs 2 "
          f"mixtures (B, 2, C, T); V1/V2: est, targets, teacher targets (B, {stems}, C, T)")
    print(f"impls: {', '.join(impls)}")
    for name, reason in skipped.items():
        print(f"  skipped {name}: {reason}")
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores{load_note}")
    copy_gbps = copy_bandwidth(device, quick=args.quick)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (median of large tensor copies, bytes read + written)")

    tasks = [(case, impl) for case in cases for impl in impls]
    rows = [measure(case, impl, device, dtype, args, copy_gbps) for case, impl in _progress(tasks)]
    fill_speedups(rows)

    show_graph = device.type == "cuda" and not args.no_graph
    print()
    print(format_table(rows, show_graph))
    print()
    if device.type == "cuda":
        ms_how, mem_how = " (triton.testing.do_bench, eager launches)", \
            "torch.cuda.max_memory_allocated during one step minus the inputs and the grad est it returns"
        graph_how = "the same step captured once in a CUDA graph and replayed (no launch overhead)"
    else:
        ms_how = f" ({args.warmup} warm-up calls, then >= {args.repeats} timed calls / {args.budget_s} s)"
        mem_how = ("peak live tensor bytes allocated during one step (torch.profiler profile_memory) minus the "
                   "grad est it returns; inputs excluded")
        graph_how = "CUDA only"
    gbps_how = " (the faster of ms and graph ms)" if show_graph else ""
    print(columns_footer(ms_how=ms_how, graph_how=graph_how, mem_how=mem_how, gbps_how=gbps_how))
    csv_path = os.path.join(args.out, "bench.csv")
    png_path = os.path.join(args.out, "bench.png")
    write_csv(csv_path, rows, {case.name: case for case in cases}, env, dtype, copy_gbps)
    plot(png_path, rows, impls, env, f"B={batch}, C={channels}, T={length}, {args.dtype}")
    print(f"\nwrote {csv_path} and {png_path}")
    failed = [row for row in rows if row.note.startswith("error")]
    return 1 if failed and len(failed) == len(rows) else 0
