"""The report CLI: how fast and how lean each nrt_kernels path is on this machine.

``python -m nrt_kernels.bench`` (or ``nrt-bench``) times forward + backward of the MixIT L1 loss
(M = 2..8 sources into 2 mixtures, both partition modes where valid) and of the V1/V2 noise-robust
losses, on the same inputs, in

* ``pytorch``: the asteroid / iSeparate-style loop of :mod:`nrt_kernels.reference`,
* ``torch.compile``: that loop compiled with inductor,
* every nrt_kernels backend that runs on the device (``triton``, ``cuda``, ``cpu``).

It writes a table to stdout, ``bench.csv`` and ``bench.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fnmatch
import math
import os
import platform
import statistics
import sys
import time
import warnings
from functools import partial
from typing import Callable

import torch

from . import reference
from .assignments import num_candidates
from .backends import IMPLS, resolve

BASELINE = "pytorch"
COMPILED = "torch.compile"
# Backends of the front-ends; "auto" is one of them and "reference" is the baseline row.
BACKENDS = tuple(impl for impl in IMPLS if impl not in ("auto", "reference"))

SHAPES = {
    # (batch, stems, channels, samples): "small" keeps the whole CPU report under 2 minutes on 2 cores.
    "small": (2, 4, 2, 8192),
    "tiny": (2, 4, 1, 256),
    # SDX23 training batches: 16 x 7 s stereo at 44.1 kHz.
    "sdx": (16, 4, 2, 308700),
}

# The weights of the schedule phase where every term runs (V1 epochs 101-200, V2 epochs 31-50).
PHASE_WEIGHTS = {"v1": (1.0, 2.0, 1.0), "v2": (0.5, 0.5, 2.0, 0.5)}

COLUMNS = """\
columns:
  case       loss and sources: mixit-M-generalized / mixit-M-equal = MixIT L1 of M estimated sources against 2
             mixtures (every assignment, or M/2 sources each); v1 / v2 = the noise-robust losses, all terms active
  impl       pytorch = asteroid/iSeparate-style loop (nrt_kernels.reference); torch.compile = that loop compiled;
             triton / cuda / cpu = nrt_kernels backends
  ms         median wall time of forward + backward (loss, then grad of est){ms_how}
  graph ms   {graph_how}
  speedup    pytorch ms / this row's ms (same case)
  extra MiB  {mem_how}
  GB/s       minimal bytes / ms: inputs read in forward, read again and grad est written in backward{gbps_how}
  %copy      GB/s as a fraction of this device's measured copy bandwidth (the roofline for a memory-bound loss)"""


@dataclasses.dataclass
class Case:
    name: str
    loss: str  # "mixit", "v1" or "v2"
    shape: tuple[int, ...]  # est shape (B, M, C, T)
    partitions: str = "generalized"

    @property
    def candidates(self) -> int:
        if self.loss == "mixit":
            return num_candidates(self.shape[1], 2, self.partitions)
        # One fixed pairing: the MixIT term searches the stems into 2 mixtures.
        return num_candidates(self.shape[1], 2, "generalized")


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    ms: float = math.nan
    graph_ms: float = math.nan
    speedup: float = math.nan
    extra_bytes: float = math.nan
    min_bytes: int = 0
    gbps: float = math.nan
    copy_fraction: float = math.nan
    compile_s: float = math.nan
    note: str = ""


# ----------------------------------------------------------------------------------------------
# Cases and the callables that run them
# ----------------------------------------------------------------------------------------------


def build_cases(shape: tuple[int, ...], min_sources: int = 2, max_sources: int = 8) -> list[Case]:
    batch, stems, channels, length = shape
    cases = []
    for sources in range(min_sources, max_sources + 1):
        for partitions in ("generalized", "equal"):
            if partitions == "equal" and sources % 2:
                continue
            cases.append(Case(f"mixit-{sources}-{partitions}", "mixit", (batch, sources, channels, length), partitions))
    return cases + [Case("v1", "v1", shape), Case("v2", "v2", shape)]


def select_cases(cases: list[Case], patterns: str | None) -> list[Case]:
    if not patterns:
        return cases
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    return [case for case in cases if any(fnmatch.fnmatchcase(case.name, p) for p in wanted)]


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    est = randn(*case.shape).requires_grad_(True)
    if case.loss == "mixit":
        batch, _, channels, length = case.shape
        return {"est": est, "mixtures": randn(batch, 2, channels, length)}
    stems = case.shape[1]
    pairing = torch.randperm(stems, generator=generator).to(device)
    inputs = {"est": est, "targets": randn(*case.shape), "pairing": pairing,
              "weights": PHASE_WEIGHTS[case.loss]}
    # V1's teacher term compares with the teacher's separation of the targets, V2's with that of the output
    # mixture; either way the loss reads one more (B, S, C, T) tensor.
    inputs["teacher_targets"] = randn(*case.shape)
    return inputs


def input_tensors(inputs: dict) -> list[torch.Tensor]:
    return [value for key, value in inputs.items() if isinstance(value, torch.Tensor) and key != "pairing"]


def min_bytes(inputs: dict) -> int:
    """Forward reads every input once; backward reads them again and writes grad est."""
    read = sum(t.numel() * t.element_size() for t in input_tensors(inputs))
    est = inputs["est"]
    return 2 * read + est.numel() * est.element_size()


def loss_function(case: Case, impl: str) -> Callable:
    """``f(inputs) -> scalar loss`` for this case on this impl ("pytorch" is the reference loop)."""
    if case.loss == "mixit":
        if impl == BASELINE:
            def mixit_reference(est, mixtures):
                return reference.mixit_loss(est, mixtures, partitions=case.partitions)
            return lambda inputs: mixit_reference(inputs["est"], inputs["mixtures"])
        from .losses import mixit_loss

        return lambda inputs: mixit_loss(inputs["est"], inputs["mixtures"], partitions=case.partitions, impl=impl)
    from .losses import noise_robust_loss

    loss_of = reference.noise_robust_loss if impl == BASELINE else partial(noise_robust_loss, impl=impl)

    def noise_robust(est, targets, teacher_targets, pairing, weights):
        return loss_of(est, targets, version=case.loss, weights=weights, teacher_targets=teacher_targets,
                       pairing=pairing)

    return lambda inputs: noise_robust(inputs["est"], inputs["targets"], inputs["teacher_targets"],
                                       inputs["pairing"], inputs["weights"])


def compiled_reference(case: Case) -> Callable:
    """torch.compile of the reference loop's forward; autograd runs inductor's compiled backward."""
    torch._dynamo.reset()
    eager = loss_function(case, BASELINE)
    if case.loss == "mixit":
        compiled = torch.compile(lambda est, mixtures: eager({"est": est, "mixtures": mixtures}), dynamic=False)
        return lambda inputs: compiled(inputs["est"], inputs["mixtures"])
    compiled = torch.compile(
        lambda est, targets, teacher_targets, pairing: eager(
            {"est": est, "targets": targets, "teacher_targets": teacher_targets, "pairing": pairing,
             "weights": PHASE_WEIGHTS[case.loss]}),
        dynamic=False)
    return lambda inputs: compiled(inputs["est"], inputs["targets"], inputs["teacher_targets"], inputs["pairing"])


def fwd_bwd_step(loss_of: Callable, inputs: dict) -> Callable:
    est = inputs["est"]

    def step():
        # autograd.grad, not .backward(): no accumulation into est.grad, so backward only writes grad est.
        (grad,) = torch.autograd.grad(loss_of(inputs), est)
        return grad

    return step


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(step: Callable, *, warmup: int, min_repeats: int, budget_s: float, max_repeats: int = 200) -> float:
    """Median wall-clock ms of ``step`` after ``warmup`` calls, timed until ``budget_s`` (``min_repeats`` at least)."""
    for _ in range(warmup):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < max_repeats):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    return 1e3 * statistics.median(times)


def time_cuda(step: Callable, *, rep_ms: int) -> float:
    from triton.testing import do_bench

    return do_bench(step, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")


def time_cuda_graph(step: Callable, *, rep_ms: int) -> float:
    """Median ms of replaying one captured forward + backward: what is left once launch overhead is gone."""
    # The graph's private memory pool cannot reuse blocks cached for the eager runs: hand them back first.
    torch.cuda.empty_cache()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    # Autograd and the caching allocator must have seen the step on the capture stream before capture.
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    try:
        return time_cuda(graph.replay, rep_ms=rep_ms)
    finally:
        del graph
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _quiet_stderr():
    # The CPU profiler's kineto backend prints start/stop lines on fd 2, between the progress bar's updates.
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes_cpu(step: Callable) -> int:
    """Peak of live tensor bytes allocated by one ``step`` (its own allocations only), from torch.profiler.

    Every CPU tensor allocation and free goes through c10's allocator, which reports to the profiler with
    profile_memory=True; inductor's buffers included. Python objects and allocator caching are not counted.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
            del result
    events = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def peak_bytes_cuda(step: Callable, device: torch.device) -> int:
    """torch.cuda.max_memory_allocated during one ``step``, minus what was allocated before it (the inputs)."""
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak - base


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """GB/s of a large tensor copy on ``device``: bytes read + bytes written / median time."""
    numel = (1 << 28) if device.type == "cuda" else (1 << (23 if quick else 25))  # 1 GiB / 32 or 128 MiB fp32
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        ms = time_cuda(lambda: dst.copy_(src), rep_ms=200)
    else:
        ms = time_cpu(lambda: dst.copy_(src), warmup=2, min_repeats=5, budget_s=0.3 if quick else 1.0)
    del src, dst
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# Which impls run here
# ----------------------------------------------------------------------------------------------


def probe_backend(impl: str, device: torch.device, allow_triton_on_cpu: bool) -> str | None:
    """None when ``impl`` runs forward + backward on ``device``; otherwise why not."""
    if impl == "triton" and device.type != "cuda" and not allow_triton_on_cpu:
        return "Triton needs a GPU (the Triton interpreter is far too slow to benchmark; name it with --impl to force)"
    try:
        resolve("mixit_l1", impl, device.type)
        from .losses import mixit_loss

        est = torch.randn(2, 3, 1, 64, device=device, requires_grad=True)
        torch.autograd.grad(mixit_loss(est, torch.randn(2, 2, 1, 64, device=device), impl=impl), est)
    except Exception as error:  # noqa: BLE001 - any failure means "not available here", with its message
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def available_impls(requested: list[str] | None, device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(impls to run, {impl: why skipped}); ``requested`` None means every one that runs here."""
    names = requested or [BASELINE, COMPILED, *BACKENDS]
    unknown = [name for name in names if name not in (BASELINE, COMPILED, "compile", *BACKENDS)]
    if unknown:
        raise SystemExit(f"unknown --impl {unknown}; choose from {[BASELINE, COMPILED, *BACKENDS]}")
    chosen, skipped = [], {}
    for name in names:
        name = COMPILED if name == "compile" else name
        if name in (BASELINE, COMPILED):
            chosen.append(name)
            continue
        reason = probe_backend(name, device, allow_triton_on_cpu=requested is not None)
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    return chosen, skipped


# ----------------------------------------------------------------------------------------------
# Running the report
# ----------------------------------------------------------------------------------------------


def measure(case: Case, impl: str, device: torch.device, dtype: torch.dtype, args, copy_gbps: float) -> Row:
    row = Row(case.name, impl)
    inputs = make_inputs(case, device, dtype, seed=args.seed)
    row.min_bytes = min_bytes(inputs)
    if impl == COMPILED and case.candidates > args.compile_max_candidates:
        row.note = f"skipped: {case.candidates} candidates > --compile-max-candidates {args.compile_max_candidates}"
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


def fill_speedups(rows: list[Row]) -> None:
    baseline = {row.case: row for row in rows if row.impl == BASELINE}
    for row in rows:
        base = baseline.get(row.case)
        if base is not None and base.ms == base.ms and row.ms == row.ms:
            row.speedup = base.ms / row.ms


def environment(device: torch.device) -> dict:
    import nrt_kernels

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu_model()
    return {"device": device.type, "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version, "nrt_kernels": nrt_kernels.__version__,
            "python": platform.python_version(),
            "load": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _fmt(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)


def format_table(rows: list[Row], show_graph: bool) -> str:
    headers = ["case", "impl", "ms"] + (["graph ms"] if show_graph else []) + \
        ["speedup", "extra MiB", "GB/s", "%copy", "note"]
    lines = []
    for row in rows:
        cells = [row.case, row.impl, _fmt(row.ms, ".3f")]
        if show_graph:
            cells.append(_fmt(row.graph_ms, ".3f"))
        cells += [_fmt(row.speedup, ".1f") + ("x" if row.speedup == row.speedup else ""),
                  _fmt(row.extra_bytes / 2**20, ".2f"), _fmt(row.gbps, ".1f"),
                  _fmt(100 * row.copy_fraction, ".1f"), row.note]
        lines.append(cells)
    widths = [max(len(headers[i]), *(len(cells[i]) for cells in lines)) if lines else len(headers[i])
              for i in range(len(headers))]
    left = {0, 1, len(headers) - 1}

    def render(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [render(headers), render(["-" * w for w in widths])]
    previous = None
    for cells in lines:
        if previous is not None and cells[0] != previous:
            out.append("")
        previous = cells[0]
        out.append(render(cells).rstrip())
    return "\n".join(out)


CSV_FIELDS = ["device", "device_name", "threads", "load", "date", "torch", "triton", "dtype", "case", "loss", "sources",
              "partitions", "shape", "impl", "ms", "graph_ms", "speedup", "extra_bytes", "min_bytes", "gbps", "copy_gbps",
              "copy_fraction", "compile_s", "note"]


def write_csv(path: str, rows: list[Row], cases: dict[str, Case], env: dict, dtype: torch.dtype,
              copy_gbps: float) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            case = cases[row.case]
            writer.writerow({
                "device": env["device"], "device_name": env["device_name"], "threads": env["threads"],
                "load": env["load"], "date": env["date"],
                "torch": env["torch"], "triton": env["triton"], "dtype": str(dtype).replace("torch.", ""),
                "case": row.case, "loss": case.loss, "sources": case.shape[1],
                "partitions": case.partitions if case.loss == "mixit" else "",
                "shape": "x".join(map(str, case.shape)), "impl": row.impl,
                "ms": _csv_number(row.ms), "graph_ms": _csv_number(row.graph_ms), "speedup": _csv_number(row.speedup),
                "extra_bytes": _csv_number(row.extra_bytes), "min_bytes": row.min_bytes,
                "gbps": _csv_number(row.gbps), "copy_gbps": _csv_number(copy_gbps),
                "copy_fraction": _csv_number(row.copy_fraction), "compile_s": _csv_number(row.compile_s),
                "note": row.note,
            })


def _csv_number(value: float) -> str:
    return "" if value != value else f"{value:.6g}"


def plot(path: str, rows: list[Row], impls: list[str], env: dict, title_shape: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case_names = list(dict.fromkeys(row.case for row in rows))
    by_key = {(row.case, row.impl): row for row in rows}
    fig, (ax_ms, ax_bw) = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(case_names) + 3), 8), sharex=True)
    width = 0.8 / max(1, len(impls))
    graph_labelled = False
    for index, impl in enumerate(impls):
        xs = [c + (index - (len(impls) - 1) / 2) * width for c in range(len(case_names))]
        ms = [by_key[(name, impl)].ms if (name, impl) in by_key else math.nan for name in case_names]
        graph = [by_key[(name, impl)].graph_ms if (name, impl) in by_key else math.nan for name in case_names]
        frac = [100 * by_key[(name, impl)].copy_fraction if (name, impl) in by_key else math.nan
                for name in case_names]
        bars = ax_ms.bar(xs, [0 if v != v else v for v in ms], width, label=impl)
        if any(v == v for v in graph):
            ax_ms.scatter(xs, graph, color="black", marker="_", s=120, zorder=3,
                          label=None if graph_labelled else "CUDA graph replay")
            graph_labelled = True
        ax_bw.bar(xs, [0 if v != v else v for v in frac], width, color=bars.patches[0].get_facecolor()
                  if bars.patches else None)
    ax_ms.set_yscale("log")
    ax_ms.set_ylabel("forward + backward, ms (log)")
    ax_ms.legend(fontsize="small", ncol=min(4, len(impls) + 1))
    ax_ms.grid(axis="y", which="both", alpha=0.3)
    ax_bw.set_ylabel("% of measured copy bandwidth")
    ax_bw.axhline(100, color="gray", linestyle="--", linewidth=1)
    ax_bw.grid(axis="y", alpha=0.3)
    ax_bw.set_xticks(range(len(case_names)))
    ax_bw.set_xticklabels(case_names, rotation=35, ha="right", fontsize="small")
    fig.suptitle(f"nrt_kernels fwd+bwd on {env['device_name']} ({title_shape}; torch {env['torch']}, "
                 f"triton {env['triton']})", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_shape(text: str, device: torch.device) -> tuple[int, ...]:
    if text == "auto":
        text = "sdx" if device.type == "cuda" else "small"
    if text in SHAPES:
        return SHAPES[text]
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise SystemExit(f"--shape must be one of {sorted(SHAPES)} or B,S,C,T (four positive ints), got {text!r}")
    return shape


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nrt_kernels.bench",
        description="Time forward+backward of the MixIT L1, V1 and V2 losses: the asteroid/iSeparate-style PyTorch "
                    "loop, torch.compile of it, and every nrt_kernels backend that runs here. Writes a table, "
                    "bench.csv and bench.png.")
    parser.add_argument("--out", default="bench-out", help="output folder (default: ./bench-out)")
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
    parser.add_argument("--max-sources", type=int, default=8, help="largest M of the MixIT cases (default 8)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: cases mixit-2/4-generalized, mixit-4-equal, v1, v2, fewer repeats")
    parser.add_argument("--compile-max-candidates", type=int, default=None,
                        help="compile only cases with at most this many candidate assignments (default: 16 on a "
                             "CPU, where inductor takes seconds to minutes per case; 64 on CUDA, where M = 7, 8 "
                             "take minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="CPU: at least this many timed calls (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="CPU: untimed calls first (default 2)")
    parser.add_argument("--budget-s", type=float, default=None, help="CPU: timing budget per row, s (default 0.5)")
    parser.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench rep time per row, ms (default 100)")
    parser.add_argument("--no-graph", action="store_true", help="CUDA: skip the CUDA-graph replay timing")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch threads (default: torch's, or 1 when the load average shows other "
                             "processes on the cores, since a stalled thread holds up a whole parallel region)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
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
    shape = parse_shape(args.shape, device)
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

    cases = build_cases(shape, max_sources=args.max_sources)
    patterns = args.cases
    if args.quick and not patterns:
        patterns = "mixit-2-generalized,mixit-4-generalized,mixit-4-equal,v1,v2"
    cases = select_cases(cases, patterns)
    if not cases:
        raise SystemExit(f"no case matches --cases {args.cases!r}; cases are mixit-M-generalized, "
                         "mixit-M-equal (M even), v1, v2")
    requested = [name.strip() for name in args.impl.split(",")] if args.impl else None
    impls, skipped = available_impls(requested, device)

    env = environment(device)
    os.makedirs(args.out, exist_ok=True)
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

    rows = []
    tasks = [(case, impl) for case in cases for impl in impls]
    with tqdm(tasks, desc="bench", unit="row", file=sys.stderr, dynamic_ncols=True) as progress:
        for case, impl in progress:
            progress.set_postfix_str(f"{case.name} / {impl}")
            rows.append(measure(case, impl, device, dtype, args, copy_gbps))
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
    print(COLUMNS.format(ms_how=ms_how, graph_how=graph_how, mem_how=mem_how, gbps_how=gbps_how))
    csv_path = os.path.join(args.out, "bench.csv")
    png_path = os.path.join(args.out, "bench.png")
    write_csv(csv_path, rows, {case.name: case for case in cases}, env, dtype, copy_gbps)
    plot(png_path, rows, impls, env, f"B={batch}, C={channels}, T={length}, {args.dtype}")
    print(f"\nwrote {csv_path} and {png_path}")
    failed = [row for row in rows if row.note.startswith("error")]
    return 1 if failed and len(failed) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
