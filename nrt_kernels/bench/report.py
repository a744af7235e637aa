"""The report's outputs: its rows, the table on stdout with the footer that explains it, bench.csv and bench.png."""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import platform
import time

import torch

from .cases import BASELINE, FAMILIES, Case

COLUMNS = """\
columns:
  case       {cases}
  impl       pytorch = asteroid/iSeparate-style loop (nrt_kernels.reference); torch.compile = that loop compiled;
             triton / cuda / cpu = nrt_kernels backends
  ms         median wall time of forward + backward (loss, then grad of est){ms_how}
  graph ms   {graph_how}
  speedup    pytorch ms / this row's ms (same case)
  extra MiB  {mem_how}
  GB/s       minimal bytes / ms: inputs read in forward, read again and grad est written in backward{gbps_how}
  %copy      GB/s as a fraction of this device's measured copy bandwidth (the roofline for a memory-bound loss)"""


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


def columns_footer(**how) -> str:
    cases = "\n             ".join(f"{family.names}: {family.description}" for family in FAMILIES)
    return COLUMNS.format(cases=cases, **how)


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
                "partitions": case.partitions,
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
