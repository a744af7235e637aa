"""Does the noise-robust loss make training robust to noisy stems?  A CPU-sized experiment.

Synthetic 4-stem "music" at 8 kHz (a harmonic bass line, a harmonic lead with vibrato, band-limited noise
bursts, percussive clicks) is corrupted the way SDX23's label-noise training data is: stems bleed into each
other, labels are swapped, stems are silenced, and the training mixture is the sum of the corrupted stems.
A small mask-based conv separator (a tiny Conv-TasNet) is trained, for each seed from the same initialisation
and with the same batches, with

  V1        iSeparate-SDX's V1 recipe: NoiseRobustLoss("v1"), the EMA mean teacher, LossSchedule.v1() with its
            300 epochs compressed into the run's steps,
  V2        the V2 recipe: NoiseRobustLoss("v2"), the teacher separating the output mixture, LossSchedule.v2()
            (70 epochs) compressed likewise,
  plain L1  L1 against the noisy stems, for the same number of steps and then on until it has trained as long
            (wall clock, evaluations excluded) as V1: the compute-matched baseline,
  plain L1, clean stems   the no-noise ceiling,

and evaluated by SDR against clean held-out stems.

    python python/label_noise_demo.py                 # seeds 0 1 2, about 40 minutes on a busy 2-core machine
    python python/label_noise_demo.py --quick         # smoke run (one seed, 80 steps), about a minute

Writes results.json (every number, the loss histories included; --replot redraws from it), sdr.png (SDR over
training and per stem, mean and spread over the seeds) and losses.png (each loss term over training, first seed)
to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nrt_kernels  # noqa: E402
from nrt_kernels.training import EMATeacher, LossSchedule, teacher_targets_v1, teacher_targets_v2  # noqa: E402
from nrt_kernels.validate import NOISE_ROBUST_TERMS  # noqa: E402

STEMS = ("bass", "lead", "noise", "clicks")
SAMPLE_RATE = 8000


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


@dataclass(frozen=True)
class Recipe:
    name: str
    loss: str  # "l1", "v1" or "v2"
    clean: bool = False  # train on the clean stems (the ceiling) instead of the noisy ones
    match: str | None = None  # a recipe whose training time this one continues to (plain L1 given V1's time)


RECIPES = (
    Recipe("V1", "v1"),
    Recipe("V2", "v2"),
    Recipe("plain L1", "l1", match="V1"),
    Recipe("plain L1, clean stems", "l1", clean=True),
)


def train(recipe: Recipe, data, test, args, init_state, seed: int, match_seconds: float | None = None):
    """Train one separator for ``args.steps`` steps, or, with ``match_seconds``, on until its training time
    (evaluations excluded) reaches ``match_seconds``.  Returns its results (plain data, as results.json holds
    them): the final per-stem SDR, for a matched run also the SDR after ``args.steps`` steps (the same run up to
    there), the SDR curve and the history of every loss term (None on steps that do not compute it)."""
    from tqdm import tqdm

    torch.manual_seed(seed + 1)  # batches and MixIT pairings: the same draws for every recipe of a seed
    model = TinySeparator()
    model.load_state_dict(init_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    mixtures, targets = data
    test_mixtures, test_clean = test
    noise_robust = recipe.loss != "l1"
    term_names = NOISE_ROBUST_TERMS[recipe.loss] if noise_robust else ()  # plain L1: the loss is its only term
    if noise_robust:
        criterion = nrt_kernels.NoiseRobustLoss(version=recipe.loss, impl="auto")
        # iSeparate's schedule (V1: 300 epochs, V2: 70) compressed into the run: one "epoch" per step.
        schedule = getattr(LossSchedule, recipe.loss)().compressed(args.steps)
        teacher = EMATeacher(model, decay=args.ema_decay)
        make_teacher_targets = teacher_targets_v1 if recipe.loss == "v1" else teacher_targets_v2
    history = {"step": [], "terms": {"loss": [], **{term: [] for term in term_names}}, "weights": []}
    result = {"eval_step": [], "eval_sdr": [], "history": history}
    eval_every = max(1, args.steps // args.evals)
    total_steps, seconds = args.steps, 0.0
    progress = tqdm(total=total_steps, desc=f"seed {seed} {recipe.name:>21}", unit="step", dynamic_ncols=True)
    step = 0
    while step < total_steps:
        begin = time.perf_counter()
        index = torch.randint(0, len(mixtures), (args.batch,))
        mixture, target = mixtures[index], targets[index]
        est = model(mixture)
        if noise_robust:
            phase = schedule(step + 1, step)
            teacher_out = make_teacher_targets(teacher.separate, target if recipe.loss == "v1" else est) \
                if phase.teacher else None
            loss, terms = criterion(est, target, weights=phase.weights, teacher_targets=teacher_out,
                                    return_terms=True)
            history["weights"].append(list(phase.weights))
        else:
            loss, terms = (est - target).abs().mean(), {}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if noise_robust:
            teacher.update(model)
        seconds += time.perf_counter() - begin
        step += 1
        progress.update()
        history["step"].append(step)
        history["terms"]["loss"].append(float(loss.detach()))
        for term in term_names:
            history["terms"][term].append(float(terms[term]) if term in terms else None)
        if step % eval_every == 0 or step in (args.steps, total_steps):
            result["eval_step"].append(step)
            result["eval_sdr"].append(evaluate(model, test_mixtures, test_clean).tolist())
        if step == args.steps and match_seconds is not None:
            result["at_steps"] = {"steps": step, "seconds": seconds,
                                  "sdr_per_stem": dict(zip(STEMS, result["eval_sdr"][-1]))}
            total_steps = max(args.steps, round(args.steps * match_seconds / seconds))
            progress.total = total_steps
            progress.refresh()
    progress.close()
    result.update(steps=step, seconds=seconds, sdr_per_stem=dict(zip(STEMS, result["eval_sdr"][-1])))
    if noise_robust:
        result["teacher_sdr_per_stem"] = dict(zip(STEMS, evaluate(teacher.model, test_mixtures, test_clean).tolist()))
    return result


# ----------------------------------------------------------------------------------------------
# Summaries and plots
# ----------------------------------------------------------------------------------------------


def rows_of(runs: dict) -> dict:
    """{row label: [per-stem SDR dict, one per seed]}: every recipe's final result, plain L1's result after
    the same number of steps as V1, and the teachers'."""
    rows = {}
    for name, per_seed in runs.items():
        first = per_seed[0]
        if "at_steps" in first:
            rows[f"{name}, {first['at_steps']['steps']} steps"] = [r["at_steps"]["sdr_per_stem"] for r in per_seed]
            rows[f"{name}, V1's time"] = [r["sdr_per_stem"] for r in per_seed]
        else:
            rows[name] = [r["sdr_per_stem"] for r in per_seed]
        if "teacher_sdr_per_stem" in first:
            rows[f"{name}'s EMA teacher"] = [r["teacher_sdr_per_stem"] for r in per_seed]
    return rows


def mean_and_spread(values):
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, spread


def smooth(steps, values, window):
    """Moving mean over the last ``window`` steps of the values a term has (None: not computed on that step),
    at the steps where it has one.  A term computed every 2nd step is drawn through its own points."""
    xs, ys, queue, total = [], [], [], 0.0
    for step, value in zip(steps, values):
        if value is None:
            continue
        queue.append((step, value))
        total += value
        while queue[0][0] <= step - window:
            total -= queue.pop(0)[1]
        xs.append(step)
        ys.append(total / len(queue))
    return xs, ys


def plot(out: Path, summary: dict) -> None:
    """sdr.png and (when the results hold the loss histories) losses.png from results.json's contents."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args, runs = summary["args"], summary["runs"]
    mixture_sdr = list(summary["mixture_sdr_per_stem"].values())
    color = {recipe.name: f"C{index}" for index, recipe in enumerate(RECIPES)}
    seeds = len(args["seeds"])
    spread_label = f"mean and min-max of {seeds} seeds" if seeds > 1 else f"seed {args['seeds'][0]}"
    fig, (ax_curve, ax_stems) = plt.subplots(1, 2, figsize=(14, 5))
    for name, per_seed in runs.items():
        # A matched run stops at a different step for each seed: the curve joins the steps every seed reached,
        # and each seed's last evaluation is a point of its own.
        steps = sorted(set.intersection(*(set(result["eval_step"]) for result in per_seed)))
        curves = [[sum(v) / len(v) for step, v in zip(result["eval_step"], result["eval_sdr"]) if step in steps]
                  for result in per_seed]
        mean = [sum(curve[i] for curve in curves) / seeds for i in range(len(steps))]
        finals = [sum(result["sdr_per_stem"].values()) / len(STEMS) for result in per_seed]
        last_steps = sorted({result["steps"] for result in per_seed})
        at = f"step {last_steps[0]}" if len(last_steps) == 1 else f"steps {last_steps[0]}-{last_steps[-1]}"
        ax_curve.plot(steps, mean, marker="o", markersize=3, color=color[name],
                      label=f"{name}: {mean_and_spread(finals)[0]:.2f} dB at {at}")
        if len(last_steps) > 1:
            ax_curve.scatter([result["steps"] for result in per_seed], finals, marker="x", color=color[name])
        if seeds > 1:
            ax_curve.fill_between(steps, [min(c[i] for c in curves) for i in range(len(steps))],
                                  [max(c[i] for c in curves) for i in range(len(steps))], color=color[name],
                                  alpha=0.15, linewidth=0)
    ax_curve.axhline(sum(mixture_sdr) / len(mixture_sdr), color="gray", linestyle=":",
                     label="the mixture as every stem")
    ax_curve.axvline(args["steps"], color="gray", linestyle="--", linewidth=1)
    ax_curve.set_xlabel("training step")
    ax_curve.set_ylabel("mean SDR on clean held-out stems (dB)")
    ax_curve.set_title(f"SDR over training ({spread_label})")
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize="small")

    rows = {label: values for label, values in rows_of(runs).items() if not label.endswith("EMA teacher")}
    width = 0.8 / len(rows)
    for index, (label, per_seed) in enumerate(rows.items()):
        recipe = max((name for name in runs if label.startswith(name)), key=len)
        xs = [s + (index - (len(rows) - 1) / 2) * width for s in range(len(STEMS))]
        stats = [mean_and_spread([values[stem] for values in per_seed]) for stem in STEMS]
        ax_stems.bar(xs, [m for m, _ in stats], width, yerr=[s for _, s in stats] if seeds > 1 else None,
                     capsize=2, label=label, color=color[recipe], edgecolor="white",
                     hatch="//" if label.endswith("V1's time") else None)
    ax_stems.set_xticks(range(len(STEMS)))
    ax_stems.set_xticklabels(STEMS)
    ax_stems.set_ylabel("final SDR (dB)")
    ax_stems.set_title("per stem, end of training" + (f" (mean, std of {seeds} seeds)" if seeds > 1 else ""))
    ax_stems.grid(axis="y", alpha=0.3)
    ax_stems.legend(fontsize="small")
    fig.suptitle(f"label-noise demo: {args['steps']} steps of batch {args['batch']} (plain L1 on to V1's training "
                 f"time), seed{'s' if seeds > 1 else ''} {', '.join(map(str, args['seeds']))}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(out / "sdr.png", dpi=110)
    plt.close(fig)

    if not all("history" in per_seed[0] for per_seed in runs.values()):
        return
    # Loss terms of the first seed, one panel per recipe.
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.2), squeeze=False)
    window = max(2, args["steps"] // 50)
    for ax, (name, per_seed) in zip(axes[0], runs.items()):
        history = per_seed[0]["history"]
        for term, values in history["terms"].items():
            xs, ys = smooth(history["step"], values, window)
            ax.plot(xs, ys, label=term, linewidth=1.5 if term == "loss" else 1)
        weights = history["weights"]
        if weights:
            # The schedule's phases: where the weights change.
            for i in [0] + [i for i in range(1, len(weights)) if weights[i] != weights[i - 1]]:
                if i:
                    ax.axvline(i, color="gray", linestyle="--", linewidth=1)
                ax.text(i, 1.0, f" w={weights[i]}", transform=ax.get_xaxis_transform(), va="top",
                        fontsize="x-small", color="gray")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"loss term (moving mean of {window} steps)")
        ax.set_title(f"{name} (seed {args['seeds'][0]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "label_noise_demo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2, quick 0")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer steps and examples, one seed")
    parser.add_argument("--steps", type=int, default=None, help="training steps per recipe (default 1000, quick 80)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=4096, help="samples per example at 8 kHz (default 4096)")
    parser.add_argument("--train-examples", type=int, default=None, help="default 2048, quick 256")
    parser.add_argument("--test-examples", type=int, default=None, help="default 256, quick 64")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--evals", type=int, default=None, help="SDR evaluations in --steps steps (default 15)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="teacher EMA decay (default: iSeparate's 0.9995 window of ~2000 of V1's ~90000 "
                             "iterations, scaled to this run's steps)")
    parser.add_argument("--bleed", type=float, default=0.4, help="probability that a stem bleeds (default 0.4)")
    parser.add_argument("--swap", type=float, default=0.3, help="probability that an example swaps two stems")
    parser.add_argument("--silence", type=float, default=0.15, help="probability that a stem is silenced")
    parser.add_argument("--recipes", nargs="+", default=[recipe.name for recipe in RECIPES],
                        choices=[recipe.name for recipe in RECIPES], metavar="NAME",
                        help=f"which recipes to train (default all: {', '.join(r.name for r in RECIPES)})")
    parser.add_argument("--replot", metavar="RESULTS_JSON",
                        help="train nothing: print the table and draw the figures of a results.json to --out")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the same arithmetic on every machine, and no thread "
                             "pool stalls when other processes share the cores)")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    if args.steps is None:
        args.steps = 80 if args.quick else 1000
    if args.train_examples is None:
        args.train_examples = 256 if args.quick else 2048
    if args.test_examples is None:
        args.test_examples = 64 if args.quick else 256
    if args.evals is None:
        args.evals = 4 if args.quick else 15
    if args.ema_decay is None:
        window = max(5.0, args.steps * 2000 / (300 * 300))
        args.ema_decay = min(0.9995, 1 - 1 / window)
    chosen = [recipe for recipe in RECIPES if recipe.name in args.recipes]
    for recipe in chosen:
        if recipe.match is not None and recipe.match not in args.recipes:
            parser.error(f"{recipe.name!r} runs for {recipe.match}'s training time: add {recipe.match!r} to --recipes")
    args.recipes = [recipe.name for recipe in chosen]
    return args


def make_data(seed: int, args):
    generator = torch.Generator().manual_seed(seed)
    clean_train = make_stems(args.train_examples, args.length, generator)
    noisy_train, noise_stats = corrupt(clean_train, generator, bleed=args.bleed, swap=args.swap, silence=args.silence)
    test_clean = make_stems(args.test_examples, args.length, generator)
    # SDX23: the training mixture is the sum of the (corrupted) stems the dataset ships.
    return (noisy_train.sum(1), noisy_train), (clean_train.sum(1), clean_train), (test_clean.sum(1), test_clean), \
        noise_stats


def print_table(title: str, rows: dict, mixture_sdr: list, seconds: dict) -> None:
    print(f"\n{title}")
    print(f"  {'recipe':<26}" + "".join(f"{stem:>15}" for stem in STEMS) + f"{'mean':>15}{'train s':>9}")
    print(f"  {'the mixture as every stem':<26}" + "".join(f"{v:>15.2f}" for v in mixture_sdr)
          + f"{sum(mixture_sdr) / len(mixture_sdr):>15.2f}")
    for label, per_seed in rows.items():
        cells = [mean_and_spread([values[stem] for values in per_seed]) for stem in STEMS]
        cells.append(mean_and_spread([sum(values.values()) / len(STEMS) for values in per_seed]))
        text = "".join(f"{m:>9.2f} ±{s:>4.2f}" if len(per_seed) > 1 else f"{m:>15.2f}" for m, s in cells)
        print(f"  {label:<26}{text}{seconds.get(label, ''):>9}")


def report(summary: dict, out: Path) -> None:
    """The table of results.json's contents, and the figures."""
    args, runs = summary["args"], summary["runs"]
    seconds = {}
    for name, per_seed in runs.items():
        first = per_seed[0]
        label = f"{name}, V1's time" if "at_steps" in first else name
        seconds[label] = f"{sum(r['seconds'] for r in per_seed) / len(per_seed):.0f}"
        if "at_steps" in first:
            seconds[f"{name}, {first['at_steps']['steps']} steps"] = \
                f"{sum(r['at_steps']['seconds'] for r in per_seed) / len(per_seed):.0f}"
            print(f"{name} on to V1's training time: {[r['steps'] for r in per_seed]} steps (seeds {args['seeds']})")
    spread = f"mean ± std of seeds {args['seeds']}" if len(args["seeds"]) > 1 else f"seed {args['seeds'][0]}"
    print_table(f"SDR (dB) on {args['test_examples']} clean held-out examples, higher is better ({spread}); "
                "train s: mean training seconds, evaluations excluded", rows_of(runs),
                list(summary["mixture_sdr_per_stem"].values()), seconds)
    plot(out, summary)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        report(json.loads(Path(args.replot).read_text()), out)
        print(f"\nwrote the figures of {args.replot} to {out}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parameters = sum(p.numel() for p in TinySeparator().parameters())
    print(f"label-noise demo: torch {torch.__version__}, nrt_kernels {nrt_kernels.__version__}, "
          f"{torch.get_num_threads()} threads, seeds {args.seeds}")
    print(f"data: {args.train_examples} training / {args.test_examples} held-out examples of 4 stems "
          f"({', '.join(STEMS)}), {args.length} samples at {SAMPLE_RATE} Hz")
    print(f"model: TinySeparator, {parameters} parameters; {args.steps} steps of batch {args.batch}, "
          f"Adam lr {args.lr}; V1 / V2: NoiseRobustLoss + EMATeacher(decay={args.ema_decay:.4f}) + "
          f"LossSchedule.v1() / .v2() compressed into the steps; plain L1 trains on to V1's training time")

    recipes = [recipe for recipe in RECIPES if recipe.name in args.recipes]
    runs = {recipe.name: [] for recipe in recipes}
    label_noise, mixture_sdrs = {}, []
    for seed in args.seeds:
        noisy_data, clean_data, test, noise_stats = make_data(seed, args)
        label_noise[seed] = noise_stats
        print(f"seed {seed}: label noise in the training stems: "
              + ", ".join(f"{k} {v}" for k, v in noise_stats.items()))
        mixture_sdrs.append(sdr(test[0][:, None].expand_as(test[1]), test[1]).mean(0).tolist())
        torch.manual_seed(seed)
        init_state = TinySeparator().state_dict()
        for recipe in recipes:
            match_seconds = runs[recipe.match][-1]["seconds"] if recipe.match else None
            runs[recipe.name].append(train(recipe, clean_data if recipe.clean else noisy_data, test, args,
                                           init_state, seed, match_seconds))
    mixture_sdr = [sum(m[i] for m in mixture_sdrs) / len(mixture_sdrs) for i in range(len(STEMS))]
    summary = {"args": vars(args), "torch": torch.__version__, "nrt_kernels": nrt_kernels.__version__,
               "label_noise": label_noise, "mixture_sdr_per_stem": dict(zip(STEMS, mixture_sdr)), "runs": runs}
    with open(out / "results.json", "w") as handle:
        json.dump(summary, handle)
    report(summary, out)
    print(f"\nwrote {out / 'results.json'}, {out / 'sdr.png'}, {out / 'losses.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
