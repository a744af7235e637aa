"""iSeparate-SDX's noise-robust training recipe (V1 or V2) end to end, on small synthetic data.

    python python/train_noise_robust.py                  # V1, CPU, well under 2 minutes
    python python/train_noise_robust.py --version v2 --device cuda
    python python/train_noise_robust.py --epochs 3 --schedule-epochs 6 --checkpoint run.pt   # stop after 3 ...
    python python/train_noise_robust.py --epochs 6 --resume run.pt --checkpoint run.pt       # ... and go on to 6

Every piece of the recipe is here: a separator (a tiny conv net), label-noised 4-stem training data (stems
bleed into each other and swap labels; the mixture is the sum of the noisy stems), the EMA mean teacher
(``EMATeacher``, unbiased start), the loss schedule (``LossSchedule.v1()`` / ``.v2()`` with its epochs
compressed into ``--schedule-epochs``, by default the run's ``--epochs``), the teacher every 2nd iteration, the
fused ``NoiseRobustLoss`` with ``impl="auto"`` (Triton on CUDA; the CPU backend or the PyTorch reference on the
CPU, never the Triton interpreter), a log line per epoch with every loss term and the clean-stem L1, and exact
resumption (``TrainingState``): ``--checkpoint`` writes the full state after every epoch, ``--resume`` continues
from one up to ``--epochs``, ending bitwise equal to a run that never stopped (tests/test_resume.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nrt_kernels  # noqa: E402
from nrt_kernels.training import (  # noqa: E402
    EMATeacher, LossSchedule, TrainingState, teacher_targets_v1, teacher_targets_v2)

SOURCES = 4


class TinySeparator(nn.Module):
    """(B, C, T) mixture -> (B, S, C, T): conv encoder, a mask per source, applied to the mixture."""

    def __init__(self, channels: int, sources: int = SOURCES, hidden: int = 24):
        super().__init__()
        self.sources, self.channels = sources, channels
        self.encoder = nn.Sequential(
            nn.Conv1d(channels, hidden, 15, padding=7), nn.GELU(),
            nn.Conv1d(hidden, hidden, 15, padding=14, dilation=2), nn.GELU(),
        )
        self.masks = nn.Conv1d(hidden, sources * channels, 1)

    def forward(self, mixture):
        batch, channels, length = mixture.shape
        masks = self.masks(self.encoder(mixture)).view(batch, self.sources, channels, length).softmax(dim=1)
        return masks * mixture[:, None]


def make_stems(count: int, channels: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 4, C, T) clean stems with distinct spectra: low sine, high sine, noise bursts, clicks."""
    t = torch.arange(length) / 8000.0
    freq = lambda low, high: low + (high - low) * torch.rand(count, 1, 1, generator=generator)  # noqa: E731
    bass = torch.sin(2 * torch.pi * freq(40, 120) * t)
    lead = 0.6 * torch.sin(2 * torch.pi * freq(500, 1500) * t)
    bursts = (torch.rand(count, 1, length // 256 + 1, generator=generator) > 0.6).float()
    noise = 0.4 * torch.randn(count, 1, length, generator=generator) * bursts.repeat_interleave(256, -1)[..., :length]
    clicks = (torch.rand(count, 1, length, generator=generator) > 0.995).float() * 2.0
    stems = torch.stack([bass, lead, noise, clicks], dim=1).expand(count, SOURCES, 1, length)
    gains = 0.5 + torch.rand(count, SOURCES, channels, 1, generator=generator)
    return stems * gains


def add_label_noise(clean: torch.Tensor, generator: torch.Generator, bleed: float = 0.3,
                    swap: float = 0.2) -> torch.Tensor:
    """SDX23-style noisy stems: each stem leaks into the next one, and some rows swap two stems' labels.
    The noisy stems still sum to the clean mixture."""
    noisy = clean.clone()
    leak = bleed * clean
    noisy -= leak
    noisy += leak.roll(1, dims=1)
    for row in torch.nonzero(torch.rand(len(clean), generator=generator) < swap).flatten().tolist():
        a, b = torch.randperm(SOURCES, generator=generator)[:2].tolist()
        noisy[row, [a, b]] = noisy[row, [b, a]]
    return noisy


# The arguments a resumed run must share with the run it continues (not --epochs: that is how far to go on).
RUN_ARGUMENTS = ("version", "schedule_epochs", "iterations", "batch", "channels", "length", "examples", "lr",
                 "ema_decay", "impl", "seed")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", choices=("v1", "v2"), default="v1")
    parser.add_argument("--epochs", type=int, default=6, help="train up to this epoch (default 6)")
    parser.add_argument("--schedule-epochs", type=int, default=None,
                        help="the epochs the paper's schedule is compressed into (default: --epochs; a resumed run "
                             "keeps its checkpoint's)")
    parser.add_argument("--iterations", type=int, default=15, help="iterations per epoch")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048, help="samples per example")
    parser.add_argument("--examples", type=int, default=256, help="training examples")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--ema-decay", type=float, default=0.99, help="0.9995 in iSeparate's full-length runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impl", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", metavar="PATH", help="write the full training state here after every epoch")
    parser.add_argument("--resume", metavar="PATH", help="continue from a --checkpoint file up to --epochs")
    parser.add_argument("--save-state", metavar="PATH",
                        help='write {"model": ..., "teacher": ...} state dicts here at the end')
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the recipe runs the compiled kernels (impl='auto'), not the interpreter")
    checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True) if args.resume else None
    if args.schedule_epochs is None:
        args.schedule_epochs = checkpoint["extra"]["run"]["schedule_epochs"] if checkpoint else args.epochs
    run = {name: getattr(args, name) for name in RUN_ARGUMENTS}

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    clean = make_stems(args.examples, args.channels, args.length, generator)
    noisy = add_label_noise(clean, generator)
    valid_clean = make_stems(32, args.channels, args.length, generator).to(device)
    clean, noisy = clean.to(device), noisy.to(device)

    model = TinySeparator(args.channels).to(device)
    teacher = EMATeacher(model, decay=args.ema_decay)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = getattr(LossSchedule, args.version)().compressed(args.schedule_epochs)
    criterion = nrt_kernels.NoiseRobustLoss(version=args.version, impl=args.impl)
    # The batches' order has its own generator; the MixIT pairings come from torch's global one (pairing=None).
    batches = torch.Generator().manual_seed(args.seed + 1)
    state = TrainingState(model, optimizer, teacher=teacher, schedule=schedule, generators={"batches": batches})
    if checkpoint is not None:
        changed = {name: (value, run[name]) for name, value in checkpoint["extra"]["run"].items()
                   if run[name] != value}
        if changed:
            sys.exit(f"--resume {args.resume}: the checkpoint's run differs in "
                     + ", ".join(f"--{name.replace('_', '-')} ({old} there, {new} here)"
                                 for name, (old, new) in changed.items()))
        state.load_state_dict(checkpoint)
        print(f"resumed from {args.resume} after epoch {state.epoch} (iteration {state.iteration}, teacher count "
              f"{teacher.count:.4f})")
    state.extra["run"] = run
    print(f"{args.version}: {criterion}, schedule {schedule.table} at epochs {schedule.milestones}, "
          f"teacher every {schedule.teacher_interval} iterations, device {device}")

    begin = time.perf_counter()
    for epoch in range(state.epoch + 1, args.epochs + 1):
        model.train()
        sums = defaultdict(float)
        counts = defaultdict(int)
        for _ in range(args.iterations):
            index = torch.randint(0, args.examples, (args.batch,), generator=batches).to(device)
            targets = noisy[index]
            est = model(targets.sum(1))
            step = schedule(epoch, state.iteration)
            teacher_out = None
            if step.teacher:
                teacher_out = (teacher_targets_v1(teacher.separate, targets) if args.version == "v1"
                               else teacher_targets_v2(teacher.separate, est))
            loss, terms = criterion(est, targets, weights=list(step.weights), teacher_targets=teacher_out,
                                    return_terms=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            teacher.update(model)
            state.iteration += 1
            for name, value in {"loss": loss.detach(), **terms}.items():
                sums[name] += float(value)
                counts[name] += 1
        with torch.no_grad():
            model.eval()
            clean_l1 = (model(valid_clean.sum(1)) - valid_clean).abs().mean().item()
            teacher_l1 = (teacher.separate(valid_clean.sum(1)) - valid_clean).abs().mean().item()
        state.epoch = epoch
        if args.checkpoint:
            state.save(args.checkpoint)
        logged = "  ".join(f"{name} {sums[name] / counts[name]:.4f}" for name in sums)
        print(f"epoch {epoch:3d}  weights {list(step.weights)}  {logged}  |  clean L1 model {clean_l1:.4f}  "
              f"teacher {teacher_l1:.4f}  ({time.perf_counter() - begin:.1f} s)", flush=True)
    if args.save_state:
        torch.save({"model": model.state_dict(), "teacher": teacher.model.state_dict()}, args.save_state)
        print(f"wrote the model's and the teacher's state dicts to {args.save_state}")


if __name__ == "__main__":
    main()
