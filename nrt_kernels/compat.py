"""Drop-in replacements for the classes training code already imports.

``from asteroid.losses import MixITLossWrapper`` (or ``PITLossWrapper``) becomes
``from nrt_kernels.compat import MixITLossWrapper`` (``PITLossWrapper``); nothing else changes.
"""
from __future__ import annotations

import functools
import numbers
import warnings

import torch
from torch import nn

from . import training
from .build_config import PIT_MAX_EXHAUSTIVE_SOURCES, PIT_METRICS
from .losses import mixit_loss, noise_robust_loss, pit_loss
from .ops.mixit_gram import metric_row_loss, mixture_statistics
from .validate import METRICS, NOISE_ROBUST_TERMS, SDR_METRICS


class SingleSrcL1(nn.Module):
    """Per-example L1, ``|est - target|`` averaged over all but the batch dim: shape (B,)."""

    def forward(self, est_targets, targets):
        return (est_targets - targets).abs().flatten(1).mean(1)


def _is_per_example_l1(loss_func) -> bool:
    if isinstance(loss_func, str):
        return loss_func == "l1"
    if isinstance(loss_func, SingleSrcL1):
        return True
    if type(loss_func).__name__ != "SingleSrcL1":
        return False
    # A class of that name from elsewhere (iSeparate's, a user's): fuse it only if it computes a per-example L1.
    generator = torch.Generator().manual_seed(0)
    est = torch.randn(3, 2, 5, 7, generator=generator, dtype=torch.float64)
    target = torch.randn(3, 2, 5, 7, generator=generator, dtype=torch.float64)
    try:
        with torch.no_grad():
            value = loss_func(est, target)
    except Exception:
        return False
    expected = SingleSrcL1()(est, target)
    return isinstance(value, torch.Tensor) and value.shape == expected.shape and torch.allclose(value, expected)


_SDR_TYPES = ("sisdr", "sdsdr", "snr")


def _fused_metric(loss_func):
    """``(metric, options)`` of :func:`nrt_kernels.mixit_loss` that computes ``loss_func`` per example, or None.

    Recognised without importing asteroid: a metric name; a per-example L1; asteroid's ``MultiSrcNegSDR`` (its
    ``multisrc_neg_sisdr`` / ``_sdsdr`` / ``_snr`` instances, the legacy ``NonPitSDR`` subclass) by its class name
    and its fields ``sdr_type``, ``zero_mean``, ``take_log=True`` and ``EPS``; asteroid's ``MultiSrcMSE`` (the class
    ``SingleSrcMSE``).  A class of one of these names is fused only if it computes that metric on a sample.
    """
    if isinstance(loss_func, str):
        return (loss_func, {}) if loss_func in METRICS else None
    if _is_per_example_l1(loss_func):
        return "l1", {}
    names = {cls.__name__ for cls in type(loss_func).__mro__}
    if "MultiSrcNegSDR" in names:
        sdr_type = getattr(loss_func, "sdr_type", None)
        zero_mean = getattr(loss_func, "zero_mean", None)
        eps = getattr(loss_func, "EPS", None)
        if (sdr_type not in _SDR_TYPES or not isinstance(zero_mean, bool) or getattr(loss_func, "take_log", None)
                is not True or isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < 1):
            return None
        metric, options = sdr_type, {"zero_mean": zero_mean, "eps": float(eps)}
    elif names & {"SingleSrcMSE", "MultiSrcMSE"}:
        metric, options = "mse", {}
    else:
        return None
    return (metric, options) if _computes(loss_func, metric, options) else None


def _computes(loss_func, metric: str, options: dict) -> bool:
    """Whether ``loss_func`` gives ``metric``'s per-example values on a random (3, 2, 50) sample."""
    generator = torch.Generator().manual_seed(0)
    est = torch.randn(3, 2, 50, generator=generator, dtype=torch.float64)
    target = torch.randn(3, 2, 50, generator=generator, dtype=torch.float64)
    try:
        with torch.no_grad():
            value = loss_func(est, target)
    except Exception:
        return False
    expected = metric_row_loss(mixture_statistics(est, target), est.shape[-1], metric, options.get("zero_mean", False),
                               options.get("eps", 0.0), 0.0)
    return (isinstance(value, torch.Tensor) and value.shape == expected.shape
            and torch.allclose(value.double(), expected, rtol=1e-6, atol=1e-9))


class MixITLossWrapper(nn.Module):
    """asteroid's ``MixITLossWrapper(loss_func, generalized=True, reduction="mean")``, fused for the losses MixIT
    trains with.

    ``forward(est_targets, targets, return_est=False)`` returns what asteroid returns: the mean loss (or the
    (B, 1) row losses for ``reduction="none"``) and, with ``return_est``, the remixed estimates (B, N, *) in the
    targets' dtype.
    Fused: a per-example L1 (``"l1"``, :class:`SingleSrcL1` or a class of that name that computes one), asteroid's
    ``MultiSrcNegSDR`` instances (``multisrc_neg_sisdr``, ``multisrc_neg_sdsdr``, ``multisrc_neg_snr``, with their
    ``zero_mean`` and ``EPS``) and ``MultiSrcMSE``, or a metric name of :func:`nrt_kernels.mixit_loss` (``"sisdr"``,
    ``"log_mse"``, ...).  The fused path flattens trailing dims into one signal per source (asteroid's SDR losses
    accept only (B, n, T)).  Any other ``loss_func`` runs the reference loop over every partition, with a one-time
    warning.
    """

    def __init__(self, loss_func, generalized=True, reduction="mean", impl="auto"):
        super().__init__()
        self.loss_func = loss_func
        self.generalized = generalized
        self.reduction = reduction
        self.impl = impl
        self.fused_metric = _fused_metric(loss_func)
        self.fused = self.fused_metric is not None
        self._warned = False

    def forward(self, est_targets, targets, return_est=False, **kwargs):
        if kwargs and isinstance(self.loss_func, str):
            raise TypeError(f"MixITLossWrapper({self.loss_func!r}) passes no keyword arguments to its loss, got "
                            f"{', '.join(kwargs)} (asteroid passes them to loss_func: give a loss_func that takes them)")
        partitions = "generalized" if self.generalized else "equal"
        if self.fused and not kwargs:
            metric, options = self.fused_metric
            outputs = mixit_loss(est_targets, targets, metric=metric, partitions=partitions, reduction="none",
                                 return_est=return_est, impl=self.impl, **options)
            row_loss, est_mixtures = outputs if return_est else (outputs, None)
        else:
            if not self._warned:
                warnings.warn(f"nrt_kernels fuses a per-example L1, asteroid's MultiSrcNegSDR and MultiSrcMSE and the "
                              f"metrics {METRICS}; {self.loss_func!r} runs the reference loop over every partition",
                              stacklevel=2)
                self._warned = True
            from . import reference  # the loop over every partition, with the user's loss

            losses = reference.candidate_losses(est_targets, targets, partitions,
                                                lambda mixed, target: self.loss_func(mixed, target, **kwargs))
            row_loss, best = torch.min(losses, dim=1)
            est_mixtures = reference.finish_mixit(row_loss, best, est_targets, targets.shape[1], partitions=partitions,
                                                  reduction="none", return_est=True, return_assignment=False)[1]
        loss = row_loss.mean() if self.reduction == "mean" else row_loss[:, None]
        if not return_est:
            return loss
        # asteroid's reorder_source writes the remixes into zeros_like(targets): they take the targets' dtype.
        return loss, est_mixtures.to(targets.dtype)


# iSeparate's random pairing forms mixture 0 from perm[:2] and mixture 1 from perm[2:], whatever the stem count.
ISEPARATE_FIRST_MIXTURE_SIZE = 2


# asteroid's find_best_perm scores every permutation up to this many sources, scipy's Hungarian above.
ASTEROID_FACTORIAL_MAX = 3
# asteroid's loss classes that PIT fuses, per pit_from mode: the class name and the metric it computes.
_PIT_FUSABLE = {
    "pw_mtx": {"PairwiseNegSDR": "sdr", "PairwiseMSE": "mse"},
    "pw_pt": {"SingleSrcNegSDR": "sdr", "SingleSrcMSE": "mse"},
    # asteroid's MultiSrcMSE is SingleSrcMSE: over (B, n, *) it is the mean of the matched pairs' MSE.
    "perm_avg": {"MultiSrcNegSDR": "sdr", "SingleSrcMSE": "mse"},
}


def _pit_options(loss_func, pit_from: str):
    """The :func:`pit_loss` options that compute what asteroid's ``PITLossWrapper(loss_func, pit_from)`` does, or
    None. asteroid's classes are recognised by class name and attributes (asteroid is never imported), then
    checked on a small input against the reference, so a different class of the same name is not fused."""
    from . import reference  # the probe's expected values; the fused path never imports it

    if isinstance(loss_func, str):
        return {"metric": loss_func} if loss_func in PIT_METRICS else None
    kind = _PIT_FUSABLE[pit_from].get(type(loss_func).__name__)
    if kind == "mse":
        options = {"metric": "mse"}
    elif kind == "sdr":
        sdr_type, zero_mean, eps = (getattr(loss_func, name, None) for name in ("sdr_type", "zero_mean", "EPS"))
        if (sdr_type not in SDR_METRICS or not isinstance(zero_mean, bool) or getattr(loss_func, "take_log", None)
                is not True or getattr(loss_func, "reduction", "none") != "none" or not isinstance(eps, float)
                or not eps >= 0):
            return None
        options = {"metric": sdr_type, "zero_mean": zero_mean, "eps": eps}
    else:
        return None
    generator = torch.Generator().manual_seed(0)
    est = torch.randn(3, 2, 64, generator=generator, dtype=torch.float64)
    targets = torch.randn(3, 2, 64, generator=generator, dtype=torch.float64)
    expected = reference.pairwise_losses(est, targets, **options)
    try:
        with torch.no_grad():
            if pit_from == "pw_mtx":
                value = loss_func(est, targets)
            elif pit_from == "pw_pt":
                value = reference.get_pw_losses(loss_func, est, targets)
            else:
                value, expected = loss_func(est, targets), expected.diagonal(dim1=1, dim2=2).mean(1)
    except Exception:
        return None
    if not (isinstance(value, torch.Tensor) and value.shape == expected.shape and torch.allclose(value, expected)):
        return None
    return options


class PITLossWrapper(nn.Module):
    """asteroid's ``PITLossWrapper(loss_func, pit_from="pw_mtx", perm_reduce=None)``, fused for its SDR and MSE losses.

    ``forward(est_targets, targets, return_est=False, reduce_kwargs=None, **kwargs)`` returns what asteroid returns:
    the batch mean of each row's best-permutation loss and, with ``return_est``, the reordered estimates.
    Fused (one pass, the permutation search on the device, no host sync, any number of sources up to
    ``nrt_kernels.build_config.PIT_MAX_SOURCES`` instead of asteroid's 9): asteroid's ``PairwiseNegSDR`` instances
    (``pairwise_neg_sisdr``, ``_sdsdr``, ``_snr``, any ``zero_mean`` / ``EPS``) and ``PairwiseMSE`` with
    ``pit_from="pw_mtx"``, ``SingleSrcNegSDR`` / ``SingleSrcMSE`` with ``"pw_pt"``, ``MultiSrcNegSDR`` /
    ``MultiSrcMSE`` with ``"perm_avg"``, and the metric names of :func:`nrt_kernels.pit_loss`. Like asteroid, up to
    3 sources every permutation is scored (ties go to the first in ``itertools.permutations`` order; ``perm_avg``
    up to 8) and above that the Hungarian algorithm runs (the loss is the same minimum; exact ties may pick a
    different permutation than scipy). Any other loss, a ``perm_reduce``, or extra ``**kwargs`` run asteroid's
    algorithm on the reference (``nrt_kernels.reference.pit_wrapper_loss``) with a one-time warning.
    """

    def __init__(self, loss_func, pit_from="pw_mtx", perm_reduce=None, impl="auto"):
        super().__init__()
        if pit_from not in ("pw_mtx", "pw_pt", "perm_avg"):
            raise ValueError(f'pit_from must be one of ("pw_mtx", "pw_pt", "perm_avg"), got {pit_from!r}')
        self.loss_func = loss_func
        self.pit_from = pit_from
        self.perm_reduce = perm_reduce
        self.impl = impl
        self.options = _pit_options(loss_func, pit_from)
        self._warned = False

    def forward(self, est_targets, targets, return_est=False, reduce_kwargs=None, **kwargs):
        num_sources = targets.shape[1]
        if isinstance(self.loss_func, str) and kwargs:
            raise TypeError(f"the {self.loss_func!r} loss takes no extra keyword arguments, got {sorted(kwargs)}")
        if self.options is not None and self.perm_reduce is None and not kwargs:
            exhaustive_max = PIT_MAX_EXHAUSTIVE_SOURCES if self.pit_from == "perm_avg" else ASTEROID_FACTORIAL_MAX
            solver = "exhaustive" if num_sources <= exhaustive_max else "hungarian"
            return pit_loss(est_targets, targets, return_est=return_est, solver=solver, impl=self.impl,
                            **self.options)
        if not self._warned:
            reason = (f"a perm_reduce ({self.perm_reduce!r})" if self.perm_reduce is not None else
                      f"extra loss arguments {sorted(kwargs)}" if self.options is not None else repr(self.loss_func))
            warnings.warn(f"nrt_kernels fuses asteroid's PairwiseNegSDR/PairwiseMSE (and single-source, perm_avg "
                          f"versions); {reason} runs asteroid's PIT algorithm on the reference", stacklevel=2)
            self._warned = True
        if num_sources >= 10:
            raise ValueError(f"asteroid's PIT algorithm supports fewer than 10 sources, got {num_sources}; the fused "
                             "losses (nrt_kernels.pit_loss metrics) have no such limit")
        from . import reference  # asteroid's algorithm with the user's loss

        loss_func, pit_from = self.loss_func, self.pit_from
        if isinstance(loss_func, str):  # a metric name with a perm_reduce: its pairwise matrix
            loss_func, pit_from = functools.partial(reference.pairwise_losses, **self.options), "pw_mtx"
        return reference.pit_wrapper_loss(loss_func, pit_from, est_targets, targets,
                                          perm_reduce=self.perm_reduce, return_est=return_est,
                                          reduce_kwargs=reduce_kwargs, **kwargs)


def _teacher_separate(ema_model):
    return functools.partial(ema_model.separate, patch_length=None)


class MixITnL1nMeanTeacher(nn.Module):
    """iSeparate-SDX's V1 loss (Wavelet-HTDemucs), fused: ``(w0 l1 + w1 MixIT + w2 teacher) / sum(weights)``.

    ``forward(outputs={'y_hat': est}, targets={'y': noisy stems}, ema_model=None, weights=None,
    mean_teacher_enable=False)`` as iSeparate's: the pairing is one ``torch.randperm(S)`` drawn (only when the
    MixIT weight is non-zero) before the teacher runs, its first 2 stems forming mixture 0 and the rest mixture 1
    for any S (odd S included); the teacher term runs when its weight is non-zero, an
    ``ema_model`` with ``.separate(x, patch_length=None)`` is given and ``mean_teacher_enable`` is true; the loss
    is divided by the sum of all three weights either way.
    """

    version = "v1"
    default_weights = (1, 0, 0)

    def __init__(self, impl="auto"):
        super().__init__()
        self.impl = impl

    def _weights(self, weights):
        return list(self.default_weights if weights is None else weights)

    def _teacher_targets(self, est, y, ema_model):
        return training.teacher_targets_v1(_teacher_separate(ema_model), y)

    def forward(self, outputs, targets, ema_model=None, weights=None, mean_teacher_enable=False):
        est, y = outputs["y_hat"], targets["y"]
        weights = self._weights(weights)
        terms = NOISE_ROBUST_TERMS[self.version]
        mixit_index, teacher_index = terms.index("mixit"), terms.index("teacher")
        pairing = torch.randperm(y.shape[1]) if len(weights) > mixit_index and weights[mixit_index] != 0 else None
        teacher = None
        if len(weights) > teacher_index and weights[teacher_index] != 0 and ema_model is not None \
                and mean_teacher_enable:
            teacher = self._teacher_targets(est, y, ema_model)
        return noise_robust_loss(est, y, version=self.version, weights=weights, teacher_targets=teacher,
                                 pairing=pairing, normalize="iseparate", impl=self.impl,
                                 _first_mixture_size=ISEPARATE_FIRST_MIXTURE_SIZE)


class MixITnL1nMeanTeacherV2(MixITnL1nMeanTeacher):
    """iSeparate-SDX's V2 loss (DWT-Transformer-UNet), fused: l1, mixture consistency, MixIT and a teacher that
    separates the detached output mixture, divided by the weights of the terms computed.  iSeparate's default
    ``weights`` has five entries of which it reads four: extra entries are ignored the same way."""

    version = "v2"
    default_weights = (1, 1, 0, 0, 0)

    def _weights(self, weights):
        return list(self.default_weights if weights is None else weights)[: len(NOISE_ROBUST_TERMS["v2"])]

    def _teacher_targets(self, est, y, ema_model):
        return training.teacher_targets_v2(_teacher_separate(ema_model), est)
