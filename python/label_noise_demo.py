"""Does the noise-robust V1 loss make training robust to noisy stems?  A CPU-sized experiment.

Synthetic 4-stem "music" at 8 kHz (a harmonic bass line, a harmonic lead with vibrato, band-limited noise
bursts, percussive clicks) is corrupted the way SDX23's label-noise training data is: stems bleed into each
other, labels are swapped, stems are silenced, and the training mixture is the sum of the corrupted stems.
A small mask-based conv separator (a tiny Conv-TasNet) is trained from the same initialisation with

  (a) plain L1 against the noisy stems,
  (b) iSeparate-SDX's V1 recipe: nrt_kernels.NoiseRobustLoss("v1") with the EMA mean teacher and
      LossSchedule.v1(), its 300 epochs compressed to the run's length,
  (c) optionally, plain L1 against the clean stems (the no-noise ceiling; --no-oracle skips it),

and evaluated by SDR against clean held-out stems.

    python python/label_noise_demo.py                 # a few minutes on 2 cores
    python python/label_noise_demo.py --quick         # smoke run, under a minute

Writes results.json, sdr.png (SDR over training and per stem) and losses.png (each loss term over training)
to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nrt_kernels  # noqa: E402
from nrt_kernels.training import EMATeacher, LossSchedule, teacher_targets_v1  # noqa: E402

STEMS = ("bass", "lead", "noise", "clicks")
SAMPLE_RATE = 8000
# The V1 loss terms, in NoiseRobustLoss(version="v1")'s weight order.
V1_TERMS = ("l1", "mixit", "teacher")


# ----------------------------------------------------------------------------------------------
# Synthetic stems
# ----------------------------------------------------------------------------------------------


def _uniform(generator, shape, low, high):
    return low + (high - low) * torch.rand(shape, generator=generator)


def _note_envelope(length, starts, attack, decay):
    """(N, T) sum of attack/exponential-decay envelopes; starts (N, K) in samples."""
    t = torch.arange(length, dtype=torch.float32)[None, None, :]
    since = t - starts[:, :, None]
    rise = (since / attack).clamp(0, 1)
    env = rise * torch.exp(-since.clamp(min=0) / decay[:, :, None])
    return torch.where(since >= 0, env, torch.zeros(())).amax(1)


def _harmonic(generator, count, length, f0_low, f0_high, harmonics, notes, vibrato):
    """Notes of a harmonic tone: a new pitch at each note start, amplitudes 1/k^p, optional vibrato."""
    t = torch.arange(length, dtype=torch.float32) / SAMPLE_RATE
    starts = torch.sort(_uniform(generator, (count, notes), -0.1 * length, 0.8 * length), dim=1).values
    starts[:, 0] = -1.0
    pitches = torch.exp(_uniform(generator, (count, notes), math.log(f0_low), math.log(f0_high)))
    # Which note sounds at each sample: the last one started.
    current = (t[None, None, :] * SAMPLE_RATE >= starts[:, :, None]).sum(1).clamp(min=1) - 1
    f0 = torch.gather(pitches, 1, current)
    if vibrato:
        f0 = f0 * (1 + 0.01 * torch.sin(2 * math.pi * _uniform(generator, (count, 1), 4, 6) * t[None, :]))
    phase = 2 * math.pi * torch.cumsum(f0, dim=1) / SAMPLE_RATE
    rolloff = _uniform(generator, (count, 1), 0.8, 1.6)
    signal = sum(torch.sin(k * phase + _uniform(generator, (count, 1), 0, 2 * math.pi)) / k**rolloff
                 * (k * f0 < SAMPLE_RATE / 2) for k in range(1, harmonics + 1))
    env = _note_envelope(length, starts.clamp(min=0), 0.01 * SAMPLE_RATE,
                         _uniform(generator, (count, notes), 0.15, 0.6) * SAMPLE_RATE)
    return signal * env


def _noise_bursts(generator, count, length):
    noise = torch.randn(count, length, generator=generator)
    spectrum = torch.fft.rfft(noise)
    freqs = torch.fft.rfftfreq(length, 1 / SAMPLE_RATE)[None, :]
    low = torch.exp(_uniform(generator, (count, 1), math.log(300), math.log(2000)))
    band = ((freqs >= low) & (freqs <= 2.5 * low)).float()
    noise = torch.fft.irfft(spectrum * band, n=length)
    bursts = 3
    centers = _uniform(generator, (count, bursts), 0, length)
    widths = _uniform(generator, (count, bursts), 0.03, 0.12) * SAMPLE_RATE
    t = torch.arange(length, dtype=torch.float32)[None, None, :]
    env = torch.exp(-0.5 * ((t - centers[:, :, None]) / widths[:, :, None]) ** 2)
    env = env * (torch.rand(count, bursts, 1, generator=generator) < 0.7)
    return noise / noise.std(dim=1, keepdim=True).clamp(min=1e-6) * env.sum(1)


def _clicks(generator, count, length):
    period = _uniform(generator, (count, 1), 0.08, 0.2) * SAMPLE_RATE
    offset = _uniform(generator, (count, 1), 0, 1) * period
    t = torch.arange(length, dtype=torch.float32)[None, :]
    since = torch.remainder(t - offset, period)
    decay = _uniform(generator, (count, 1), 0.002, 0.008) * SAMPLE_RATE
    accents = 0.5 + 0.5 * torch.rand(count, length, generator=generator)
    crackle = torch.randn(count, length, generator=generator)
    return crackle * torch.exp(-since / decay) * accents


def make_stems(count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 4, 1, length) clean stems, each scaled to an RMS between 0.05 and 0.15."""
    stems = torch.stack([
        _harmonic(generator, count, length, 45, 160, 5, 3, vibrato=False),
        _harmonic(generator, count, length, 220, 900, 8, 4, vibrato=True),
        _noise_bursts(generator, count, length),
        _clicks(generator, count, length),
    ], dim=1)
    rms = stems.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-6)
    stems = stems / rms * _uniform(generator, (count, 4, 1), 0.05, 0.15)
    return stems[:, :, None, :]


def corrupt(stems: torch.Tensor, generator: torch.Generator, *, bleed: float, swap: float, silence: float):
    """SDX23-style label noise, per example: each stem may take in part of another (bleeding), two stems may
    trade labels (swap), a stem may be replaced by silence.  Returns (noisy stems, counts of each corruption)."""
    noisy = stems.clone()
    count, num_stems = stems.shape[:2]
    rows = torch.arange(count)
    bleeding = torch.rand(count, num_stems, generator=generator) < bleed
    donors = (torch.arange(num_stems)[None, :] + torch.randint(1, num_stems, (count, num_stems),
                                                                 generator=generator)) % num_stems
    amount = _uniform(generator, (count, num_stems), 0.3, 0.8)
    noisy = noisy + (bleeding * amount)[:, :, None, None] * stems[rows[:, None], donors]
    swapping = torch.rand(count, generator=generator) < swap
    first = torch.randint(0, num_stems, (count,), generator=generator)
    second = (first + torch.randint(1, num_stems, (count,), generator=generator)) % num_stems
    order = torch.arange(num_stems).repeat(count, 1)
    order[rows[swapping], first[swapping]] = second[swapping]
    order[rows[swapping], second[swapping]] = first[swapping]
    noisy = noisy[rows[:, None], order]
    silenced = torch.rand(count, num_stems, generator=generator) < silence
    noisy = noisy * (~silenced)[:, :, None, None]
    stats = {"examples": count, "bleeding stems": int(bleeding.sum()), "swapped pairs": int(swapping.sum()),
             "silenced stems": int(silenced.sum()),
             "examples with any corruption": int((bleeding.any(1) | swapping | silenced.any(1)).sum())}
    return noisy, stats


# ----------------------------------------------------------------------------------------------
# Model and metric
# ----------------------------------------------------------------------------------------------


class TinySeparator(nn.Module):
    """A small Conv-TasNet: learned encoder, dilated depthwise-separable conv blocks, one mask per source,
    shared decoder.  (N, C, T) mixture -> (N, sources, C, T) estimates."""

    def __init__(self, sources=4, channels=1, width=64, hidden=96, blocks=5, kernel=16):
        super().__init__()
        self.sources, self.channels, self.width = sources, channels, width
        stride = kernel // 2
        self.encoder = nn.Conv1d(channels, width, kernel, stride=stride, bias=False)
        self.decoder = nn.ConvTranspose1d(width, channels, kernel, stride=stride, bias=False)
        self.bottleneck = nn.Conv1d(width, hidden, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(hidden, hidden, 3, padding=2**i, dilation=2**i, groups=hidden), nn.PReLU(),
                          nn.GroupNorm(1, hidden), nn.Conv1d(hidden, hidden, 1))
            for i in range(blocks))
        self.masks = nn.Conv1d(hidden, sources * width, 1)

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        batch, _, length = mixture.shape
        encoded = torch.relu(self.encoder(mixture))
        features = self.bottleneck(encoded)
        for block in self.blocks:
            features = features + block(features)
        masks = torch.sigmoid(self.masks(features)).view(batch, self.sources, self.width, -1)
        masked = (masks * encoded[:, None]).reshape(batch * self.sources, self.width, -1)
        return self.decoder(masked).view(batch, self.sources, self.channels, -1)[..., :length]


def sdr(est: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Signal-to-distortion ratio in dB per (example, stem): 10 log10(|s|^2 / |s - est|^2)."""
    signal = reference.pow(2).flatten(2).sum(-1)
    error = (reference - est).pow(2).flatten(2).sum(-1)
    return 10 * torch.log10((signal + eps) / (error + eps))


@torch.no_grad()
def evaluate(model: nn.Module, mixtures: torch.Tensor, clean: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """(stems,) mean SDR over the held-out examples."""
    was_training = model.training
    model.eval()
    scores = torch.cat([sdr(model(mixtures[i:i + batch]), clean[i:i + batch]) for i in range(0, len(clean), batch)])
    model.train(was_training)
    return scores.mean(0)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def train(name, recipe, data, test, args, init_state):
    """Train one separator; returns its history (loss terms, SDR curve) and final per-stem SDR."""
    from tqdm import tqdm

    torch.manual_seed(args.seed + 1)  # batches and MixIT pairings: the same draws for every recipe
    model = TinySeparator()
    model.load_state_dict(init_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    mixtures, targets = data
    test_mixtures, test_clean = test
    history = {"step": [], "terms": {}, "weights": [], "eval_step": [], "eval_sdr": []}
    if recipe == "v1":
        criterion = nrt_kernels.NoiseRobustLoss(version="v1", impl="auto")
        schedule = LossSchedule.v1()
        teacher = EMATeacher(model, decay=args.ema_decay)
    term_names = list(V1_TERMS) if recipe == "v1" else ["l1"]
    history["terms"] = {"loss": [], **{term: [] for term in term_names}}
    eval_every = max(1, args.steps // args.evals)
    begin = time.perf_counter()
    for step in tqdm(range(args.steps), desc=f"{name:>16}", unit="step",
                     dynamic_ncols=True):
        index = torch.randint(0, len(mixtures), (args.batch,))
        mixture, target = mixtures[index], targets[index]
        est = model(mixture)
        if recipe == "v1":
            # The 300 epochs of iSeparate's V1 run, compressed into this run's steps (100 per phase).
            epoch = 1 + (step * args.epochs) // args.steps
            phase = schedule(epoch, step)
            teacher_out = teacher_targets_v1(teacher.separate, target) if phase.teacher else None
            loss, terms = criterion(est, target, weights=phase.weights, teacher_targets=teacher_out,
                                    return_terms=True)
            history["weights"].append(list(phase.weights))
        else:
            loss = (est - target).abs().mean()
            terms = {"l1": loss.detach()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if recipe == "v1":
            teacher.update(model)
        history["step"].append(step)
        history["terms"]["loss"].append(float(loss.detach()))
        for term in term_names:
            history["terms"][term].append(float(terms[term]) if term in terms else math.nan)
        if (step + 1) % eval_every == 0 or step + 1 == args.steps:
            history["eval_step"].append(step + 1)
            history["eval_sdr"].append(evaluate(model, test_mixtures, test_clean).tolist())
    history["seconds"] = time.perf_counter() - begin
    final = evaluate(model, test_mixtures, test_clean)
    result = {"sdr_per_stem": dict(zip(STEMS, final.tolist())), "sdr_mean": float(final.mean())}
    if recipe == "v1":
        result["teacher_sdr_mean"] = float(evaluate(teacher.model, test_mixtures, test_clean).mean())
    return history, result


def smooth(values, window):
    out, total, count, queue = [], 0.0, 0, []
    for value in values:
        queue.append(value)
        if not math.isnan(value):
            total += value
            count += 1
        if len(queue) > window:
            old = queue.pop(0)
            if not math.isnan(old):
                total -= old
                count -= 1
        out.append(total / count if count else math.nan)
    return out


def plot(out: Path, runs: dict, mixture_sdr: list, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_stems) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, (history, result) in runs.items():
        mean_curve = [sum(values) / len(values) for values in history["eval_sdr"]]
        ax_curve.plot(history["eval_step"], mean_curve, marker="o", markersize=3,
                      label=f"{name}: {result['sdr_mean']:.2f} dB")
    ax_curve.axhline(sum(mixture_sdr) / len(mixture_sdr), color="gray", linestyle=":",
                     label="mixture as every stem")
    ax_curve.set_xlabel("training step")
    ax_curve.set_ylabel("mean SDR on clean held-out stems (dB)")
    ax_curve.set_title("SDR over training")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize="small")
    width = 0.8 / max(1, len(runs))
    for index, (name, (_, result)) in enumerate(runs.items()):
        xs = [s + (index - (len(runs) - 1) / 2) * width for s in range(len(STEMS))]
        ax_stems.bar(xs, [result["sdr_per_stem"][stem] for stem in STEMS], width, label=name)
    ax_stems.set_xticks(range(len(STEMS)))
    ax_stems.set_xticklabels(STEMS)
    ax_stems.set_ylabel("final SDR (dB)")
    ax_stems.set_title("per stem, end of training")
    ax_stems.grid(axis="y", alpha=0.3)
    ax_stems.legend(fontsize="small")
    fig.suptitle(f"label-noise demo: {args.steps} steps, batch {args.batch}, seed {args.seed}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(out / "sdr.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.2), squeeze=False)
    window = max(1, args.steps // 50)
    for ax, (name, (history, _)) in zip(axes[0], runs.items()):
        for term, values in history["terms"].items():
            ax.plot(history["step"], smooth(values, window), label=term, linewidth=1.5 if term == "loss" else 1)
        if history["weights"]:
            # Shade the schedule's phases: where the weights change.
            boundaries = [i for i in range(1, len(history["weights"]))
                          if history["weights"][i] != history["weights"][i - 1]]
            for i in boundaries:
                ax.axvline(i, color="gray", linestyle="--", linewidth=1)
                ax.text(i, 1.0, f" w={history['weights'][i]}", transform=ax.get_xaxis_transform(), va="top",
                        fontsize="x-small", color="gray")
            ax.text(0, 1.0, f" w={history['weights'][0]}", transform=ax.get_xaxis_transform(), va="top",
                    fontsize="x-small", color="gray")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"loss term (moving mean of {window} steps)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "label_noise_demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer steps and examples (< 1 minute)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per recipe (default 1500, quick 80)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096, help="samples per example at 8 kHz (default 4096)")
    parser.add_argument("--train-examples", type=int, default=None, help="default 2048, quick 256")
    parser.add_argument("--test-examples", type=int, default=None, help="default 256, quick 64")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--evals", type=int, default=None, help="SDR evaluations during training (default 15)")
    parser.add_argument("--epochs", type=int, default=300,
                        help="V1 epochs the run stands for (default 300: 100 per schedule phase)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="teacher EMA decay (default: iSeparate's 0.9995 window of ~2000 of its ~90000 "
                             "iterations, scaled to this run's steps)")
    parser.add_argument("--bleed", type=float, default=0.4, help="probability that a stem bleeds (default 0.4)")
    parser.add_argument("--swap", type=float, default=0.3, help="probability that an example swaps two stems")
    parser.add_argument("--silence", type=float, default=0.15, help="probability that a stem is silenced")
    parser.add_argument("--no-oracle", action="store_true", help="skip (c), plain L1 on the clean stems")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the same arithmetic on every machine, and no thread "
                             "pool stalls when other processes share the cores)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 80 if args.quick else 1500
    if args.train_examples is None:
        args.train_examples = 256 if args.quick else 2048
    if args.test_examples is None:
        args.test_examples = 64 if args.quick else 256
    if args.evals is None:
        args.evals = 4 if args.quick else 15
    if args.ema_decay is None:
        window = max(5.0, args.steps * 2000 / (300 * 300))
        args.ema_decay = min(0.9995, 1 - 1 / window)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    clean_train = make_stems(args.train_examples, args.length, generator)
    noisy_train, noise_stats = corrupt(clean_train, generator, bleed=args.bleed, swap=args.swap, silence=args.silence)
    test_clean = make_stems(args.test_examples, args.length, generator)
    test_mixtures = test_clean.sum(1)
    # SDX23: the training mixture is the sum of the (corrupted) stems the dataset ships.
    noisy_data = (noisy_train.sum(1), noisy_train)
    clean_data = (clean_train.sum(1), clean_train)
    mixture_sdr = sdr(test_mixtures[:, None].expand_as(test_clean), test_clean).mean(0).tolist()

    torch.manual_seed(args.seed)
    init_state = TinySeparator().state_dict()
    parameters = sum(p.numel() for p in TinySeparator().parameters())
    print(f"label-noise demo: torch {torch.__version__}, nrt_kernels {nrt_kernels.__version__}, "
          f"{torch.get_num_threads()} threads, seed {args.seed}")
    print(f"data: {args.train_examples} training / {args.test_examples} held-out examples of 4 stems "
          f"({', '.join(STEMS)}), {args.length} samples at {SAMPLE_RATE} Hz")
    print("label noise in the training stems: " + ", ".join(f"{k} {v}" for k, v in noise_stats.items()))
    print(f"model: TinySeparator, {parameters} parameters; {args.steps} steps of batch {args.batch}, Adam lr {args.lr}")

    recipes = [("plain L1 (noisy)", "l1", noisy_data), ("V1 (noisy)", "v1", noisy_data)]
    print(f"V1: NoiseRobustLoss('v1') + EMATeacher(decay={args.ema_decay:.4f}) + LossSchedule.v1(), "
          f"{args.epochs} epochs compressed into {args.steps} steps")
    if not args.no_oracle:
        recipes.append(("plain L1 (clean)", "l1", clean_data))

    runs = {}
    for name, recipe, data in recipes:
        runs[name] = train(name, recipe, data, (test_mixtures, test_clean), args, init_state)

    print()
    print(f"SDR (dB) on {args.test_examples} clean held-out examples, higher is better:")
    header = f"  {'recipe':<18}" + "".join(f"{stem:>9}" for stem in STEMS) + f"{'mean':>9}{'train s':>9}"
    print(header)
    print(f"  {'mixture as stem':<18}" + "".join(f"{v:>9.2f}" for v in mixture_sdr)
          + f"{sum(mixture_sdr) / len(mixture_sdr):>9.2f}")
    for name, (history, result) in runs.items():
        print(f"  {name:<18}" + "".join(f"{result['sdr_per_stem'][stem]:>9.2f}" for stem in STEMS)
              + f"{result['sdr_mean']:>9.2f}{history['seconds']:>9.0f}")
        if "teacher_sdr_mean" in result:
            print(f"  {'  its EMA teacher':<18}" + " " * 9 * len(STEMS) + f"{result['teacher_sdr_mean']:>9.2f}")
    plot(out, runs, mixture_sdr, args)
    summary = {
        "args": vars(args), "torch": torch.__version__, "label_noise": noise_stats,
        "mixture_sdr_per_stem": dict(zip(STEMS, mixture_sdr)),
        "runs": {name: {**result, "seconds": history["seconds"], "eval_step": history["eval_step"],
                        "eval_sdr_mean": [sum(v) / len(v) for v in history["eval_sdr"]]}
                 for name, (history, result) in runs.items()},
    }
    with open(out / "results.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"\nwrote {out / 'results.json'}, {out / 'sdr.png'}, {out / 'losses.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
