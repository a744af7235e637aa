"""EMATeacher.update (foreach, grouped by device and dtype) against iSeparate's per-tensor ModelEMA2 loop.

    OMP_NUM_THREADS=1 python benchmarks/bench_ema.py                 # CPU, 1 thread: the issue's 400-tensor model
    python benchmarks/bench_ema.py --device cuda --tensors 400 1600  # on a GPU

Prints one row per model size: microseconds per update (the best of --repeats timings of --updates updates each,
the two taking turns), after checking that both give the same teacher.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nrt_kernels.training import EMATeacher  # noqa: E402


class PerTensorEMA:
    """iSeparate's ModelEMA2.update: two in-place ops per parameter, one copy per buffer."""

    def __init__(self, model: nn.Module, decay: float):
        self.teacher = EMATeacher(model, decay=decay)  # only its deep copy of the model is used
        self.decay, self.count = decay, 0.0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.count = self.count * self.decay + 1
        weight = 1 / self.count
        for online, average in zip(model.parameters(), self.teacher.model.parameters()):
            average.mul_(1 - weight).add_(online.detach(), alpha=weight)
        for online, average in zip(model.buffers(), self.teacher.model.buffers()):
            average.copy_(online.detach())


def make_model(tensors: int, width: int, device: torch.device) -> nn.Module:
    """``tensors`` parameter tensors (Linear weights and biases, width x width) and one BatchNorm's buffers."""
    layers = [nn.Linear(width, width) for _ in range(tensors // 2 - 1)] + [nn.BatchNorm1d(width)]
    return nn.Sequential(*layers).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_updates(emas: list, model: nn.Module, device: torch.device, updates: int, repeats: int) -> list:
    """Microseconds per update of each EMA: the best of ``repeats`` timings of ``updates`` updates, the EMAs
    taking turns so that every one sees the same load from other processes."""
    best = [math.inf] * len(emas)
    for ema in emas:
        for _ in range(3):
            ema.update(model)
    for _ in range(repeats):
        for index, ema in enumerate(emas):
            synchronize(device)
            begin = time.perf_counter()
            for _ in range(updates):
                ema.update(model)
            synchronize(device)
            best[index] = min(best[index], (time.perf_counter() - begin) / updates * 1e6)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tensors", type=int, nargs="+", default=[100, 400, 1600],
                        help="parameter tensors in the model (default 100 400 1600)")
    parser.add_argument("--width", type=int, default=64, help="features of each Linear (default 64)")
    parser.add_argument("--updates", type=int, default=20, help="updates per timing (default 20)")
    parser.add_argument("--repeats", type=int, default=25, help="timings per row, the best is printed")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"EMA update, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'tensors':>8} {'elements':>10} {'per-tensor us':>14} {'foreach us':>11} {'speed-up':>9}")
    for tensors in args.tensors:
        torch.manual_seed(0)
        model = make_model(tensors, args.width, device)
        loop, fused = PerTensorEMA(model, 0.999), EMATeacher(model, decay=0.999)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        loop.update(model)
        fused.update(model)
        for expected, actual in zip(loop.teacher.model.state_dict().values(), fused.model.state_dict().values()):
            torch.testing.assert_close(actual, expected, rtol=1.3e-6, atol=1e-6)  # float32 rounding
        per_tensor, foreach = time_updates([loop, fused], model, device, args.updates, args.repeats)
        elements = sum(p.numel() for p in model.parameters())
        print(f"{len(list(model.parameters())):>8} {elements:>10} {per_tensor:>14.0f} {foreach:>11.0f} "
              f"{per_tensor / foreach:>8.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
