"""Range observers: collect statistics batch by batch, derive quantization parameters once.

The torch.ao pattern: ``update(x)`` per batch, then ``range()`` (lo, hi) for asymmetric schemes and
``amax()`` for symmetric ones; ``symmetric()`` / ``asymmetric()`` turn those into scale / zero point.
Swapping the calibration method is swapping the observer.

Histogram observers (percentile, entropy, mse) keep one signed histogram of ``2 * bins`` equal bins over
``[-R, R]``; the |x| histogram (``bins`` bins over ``[0, R]``) is the fold of its two halves, exactly,
because the edges are symmetric about 0. Memory stays bounded whatever the number of batches. When a batch
exceeds ``R``, ``R`` doubles (as often as needed) and adjacent bin pairs merge: an exact re-bin, no
interpolation, at the cost of resolution. To get TensorRT's exact histogram (range = the final max) call
``prime(lo, hi)`` with the range from a first min/max pass before the first ``update``; ``calibrate_two_pass``
does that two-pass calibration for any source of tensors.

``SearchObserver`` ("search") keeps one histogram and offers every method's range as a candidate;
``bottlefit.calibration.search`` judges them per tensor; ``FixedObserver`` carries the winner.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import numpy as np
import torch

from bottlefit.errors import UserError

ArrayLike = np.ndarray | torch.Tensor

QRANGES: dict[str, tuple[int, int]] = {"int8": (-128, 127), "uint8": (0, 255)}


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to(torch.float32).cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _f32(v: float) -> float:
    # Artifacts store scales as float32: derive in float64, round once, so every writer agrees.
    return float(np.float32(v))


class Observer:
    """Base: tracks the exact min and max seen; subclasses refine ``amax`` and ``range``."""

    name = "base"

    def __init__(self) -> None:
        self.min_val = math.inf
        self.max_val = -math.inf
        self.count = 0

    def update(self, x: ArrayLike) -> None:
        a = _to_numpy(x)
        if a.size == 0:
            return
        if not np.isfinite(a).all():
            raise ValueError(f"{type(self).__name__}: non-finite values in calibration data")
        self.min_val = min(self.min_val, float(a.min()))
        self.max_val = max(self.max_val, float(a.max()))
        self.count += int(a.size)
        self._update(a)

    def _update(self, a: np.ndarray) -> None:
        """Subclass hook: accumulate statistics of one (finite, non-empty) batch."""

    def _check(self) -> None:
        if self.count == 0:
            raise ValueError(f"{type(self).__name__}: no data observed; run calibration batches first")

    def range(self) -> tuple[float, float]:
        """(lo, hi) for asymmetric quantization."""
        self._check()
        return self.min_val, self.max_val

    def amax(self) -> float:
        """Clipping threshold for symmetric quantization (values beyond ±amax saturate)."""
        lo, hi = self.range()
        return max(abs(lo), abs(hi))

    def symmetric(self, qmax: int = 127) -> float:
        """Scale for symmetric quantization to [-qmax, qmax], zero point 0 (TensorRT: amax / 127)."""
        a = self.amax()
        # An all-zero tensor: any scale represents it exactly; 1.0 keeps the reciprocal finite.
        return _f32(a / qmax) if a > 0 else 1.0

    def asymmetric(self, dtype: str = "int8") -> tuple[float, int]:
        """(scale, zero_point) for affine quantization; the range is widened to include 0 so that 0 is
        exactly representable (TFLite and ONNX Runtime require it)."""
        if dtype not in QRANGES:
            raise ValueError(f"dtype must be one of {sorted(QRANGES)}, got {dtype!r}")
        qmin, qmax = QRANGES[dtype]
        lo, hi = self.range()
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi == lo:
            return 1.0, 0 if qmin < 0 else qmin
        scale = _f32((hi - lo) / (qmax - qmin))
        # Round half to even, as ONNX Runtime's quantizer (numpy.round) does.
        zp = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
        return scale, zp

    def describe(self) -> dict[str, Any]:
        lo, hi = self.range()
        return {"observer": self.name, "min": self.min_val, "max": self.max_val, "lo": lo, "hi": hi,
                "amax": self.amax()}


class MinMaxObserver(Observer):
    """The exact range seen: nothing is clipped."""

    name = "minmax"


class HistogramObserver(Observer):
    """Signed histogram over [-R, R] with ``2 * bins`` bins; see the module docstring for re-binning."""

    name = "histogram"

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if bins < 2 or bins % 2:
            raise ValueError(f"bins must be an even number >= 2, got {bins}")
        self.bins = bins
        self.R = 0.0
        self.hist = np.zeros(2 * bins, dtype=np.int64)
        self._zeros = 0  # values seen while R == 0 (all zeros so far); placed once R is known

    def prime(self, lo: float, hi: float) -> None:
        """Fix the histogram range from a first pass (TensorRT's two-pass calibration)."""
        if self.count:
            raise RuntimeError("prime() must come before the first update()")
        self.R = float(max(abs(lo), abs(hi)))

    def _grow(self, new_r: float) -> None:
        if self.R == 0.0:
            self.R = new_r
            self.hist[self.bins] += self._zeros  # bin [0, width) on the positive side
            self._zeros = 0
            return
        while self.R < new_r:
            # [-R, R] becomes the middle half of [-2R, 2R]; bin pairs (2j, 2j+1) merge into one.
            merged = self.hist.reshape(-1, 2).sum(axis=1)
            self.hist = np.zeros_like(self.hist)
            q = self.bins // 2
            self.hist[q : q + self.bins] = merged
            self.R *= 2.0

    def _update(self, a: np.ndarray) -> None:
        m = float(np.abs(a).max())
        if m > self.R:
            if m == 0.0:
                return
            self._grow(m)
        if self.R == 0.0:
            self._zeros += int(a.size)
            return
        v = a.ravel().astype(np.float64)
        # Bin |x| and mirror, so -x and x land in mirror bins and the fold into |x| is exact at edges.
        k = np.floor(np.abs(v) * (self.bins / self.R)).astype(np.int64)
        np.minimum(k, self.bins - 1, out=k)  # |x| == R belongs to the last bin, as in numpy.histogram
        idx = np.where(v >= 0, self.bins + k, self.bins - 1 - k)
        self.hist += np.bincount(idx, minlength=2 * self.bins)

    @property
    def bin_width(self) -> float:
        return self.R / self.bins

    def abs_hist(self) -> np.ndarray:
        """Histogram of |x|: ``bins`` bins over [0, R]."""
        h = self.hist[self.bins :].copy()
        h += self.hist[: self.bins][::-1]
        h[0] += self._zeros
        return h

    def _clip_range(self, amax: float) -> tuple[float, float]:
        # A symmetric threshold applied to the observed range: a ReLU output stays (0, amax).
        self._check()
        return max(self.min_val, -amax), min(self.max_val, amax)

    def amax(self) -> float:
        # Subclasses pick a clipping threshold from the histogram; the bare histogram clips nothing.
        self._check()
        return max(abs(self.min_val), abs(self.max_val))

    def range(self) -> tuple[float, float]:
        return self._clip_range(self.amax())


def _percentile_from_hist(hist: np.ndarray, lo_edge: float, width: float, q: float) -> float:
    """Value below which a fraction ``q`` of the counts lies, interpolating linearly inside a bin."""
    cdf = np.cumsum(hist, dtype=np.float64)
    target = q * cdf[-1]
    i = int(np.searchsorted(cdf, target, side="left"))
    i = min(i, len(hist) - 1)
    before = cdf[i - 1] if i > 0 else 0.0
    frac = (target - before) / hist[i] if hist[i] > 0 else 1.0
    return lo_edge + (i + float(np.clip(frac, 0.0, 1.0))) * width


class PercentileObserver(HistogramObserver):
    """Clip at a percentile: of |x| for the symmetric amax, of each tail of x for the asymmetric range."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def amax(self) -> float:
        self._check()
        if self.R == 0.0:
            return 0.0
        v = _percentile_from_hist(self.abs_hist(), 0.0, self.bin_width, self.percentile / 100.0)
        return min(v, max(abs(self.min_val), abs(self.max_val)))

    def range(self) -> tuple[float, float]:
        self._check()
        if self.R == 0.0:
            return 0.0, 0.0
        q = self.percentile / 100.0
        lo = _percentile_from_hist(self.hist, -self.R, self.bin_width, 1.0 - q)
        hi = _percentile_from_hist(self.hist, -self.R, self.bin_width, q)
        return max(lo, self.min_val), min(hi, self.max_val)


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL(p || q) over bins where p > 0 (both normalized). Bins where q is 0 get ``eps`` taken evenly
    from q's other bins, as MXNet and ONNX Runtime smooth it: an isolated outlier folded into P's last bin
    then makes clipping cost a finite amount instead of ruling out every threshold below it."""
    zero = q == 0
    n_zero = int(zero.sum())
    if n_zero:
        n_nz = q.size - n_zero
        if n_nz == 0:
            return math.inf
        q = q + eps * zero - (eps * n_zero / n_nz) * ~zero
        if (q <= 0).any():
            return math.inf
    return float(np.sum(p * np.log(p / q)))


class EntropyObserver(HistogramObserver):
    """TensorRT EntropyCalibration2: the threshold minimizing KL(P || Q) over a 2048-bin |x| histogram.

    For each candidate ``i`` in [start_bin, bins]: P = hist[:i] with the outlier mass hist[i:] added to
    P's last bin; Q = hist[:i] (without the outliers, as in NVIDIA's published algorithm) merged into
    ``quant_bins`` windows, each window's mass spread evenly over the bins where P is non-zero (zeros stay
    zeros); where Q is 0 but P is not (an outlier folded into an empty last window), Q is smoothed (see
    ``_kl``). amax = (argmin_i + 0.5) * bin width. Clipping heavy tails is what this buys over min/max.
    """

    name = "entropy"

    def __init__(self, bins: int = 2048, quant_bins: int = 128, start_bin: int | None = None) -> None:
        super().__init__(bins)
        self.quant_bins = quant_bins
        self.start_bin = quant_bins if start_bin is None else start_bin
        if not 0 < self.quant_bins <= self.start_bin <= bins:
            raise ValueError("need 0 < quant_bins <= start_bin <= bins")

    def divergences(self) -> tuple[np.ndarray, np.ndarray]:
        """(candidate bin counts i, KL(P||Q) for each)."""
        hist = self.abs_hist().astype(np.float64)
        # Exact zeros (ReLU outputs, max-pool of them) pile into bin 0; that spike dominates KL and makes every
        # wider merge window look lossy, so thresholds collapse (1.06 chosen for a max of 8.5, cosine 0.86).
        # NVIDIA's histogram calibrator neutralizes the zero bin the same way: give it its neighbour's count.
        if len(hist) > 1:
            hist[0] = hist[1]
        cands = np.arange(self.start_bin, self.bins + 1)
        kl = np.full(len(cands), np.inf)
        total_tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # total_tail[i] = hist[i:].sum()
        for k, i in enumerate(cands):
            p = hist[:i].copy()
            p[-1] += total_tail[i]
            nz = p > 0
            # Windows of i // quant_bins bins; the last window absorbs the remainder.
            m = i // self.quant_bins
            starts = np.arange(self.quant_bins) * m
            win_sum = np.add.reduceat(hist[:i], starts)
            win_nz = np.add.reduceat(nz.astype(np.float64), starts)
            lengths = np.diff(np.append(starts, i))
            per_bin = np.divide(win_sum, win_nz, out=np.zeros_like(win_sum), where=win_nz > 0)
            q = np.repeat(per_bin, lengths) * nz
            ps, qs = p.sum(), q.sum()
            if ps == 0 or qs == 0:
                continue
            kl[k] = _kl(p[nz] / ps, q[nz] / qs)
        return cands, kl

    def amax(self) -> float:
        self._check()
        if self.R == 0.0:
            return 0.0
        cands, kl = self.divergences()
        if not np.isfinite(kl).any():
            return max(abs(self.min_val), abs(self.max_val))
        i = int(cands[int(np.argmin(kl))])  # first minimum on ties: the tighter threshold
        return (i + 0.5) * self.bin_width


class MseObserver(HistogramObserver):
    """The symmetric amax minimizing the mean squared int8 quantization error over the |x| histogram.

    Candidates are the bin upper edges from ``min_bin`` to ``bins``; each bin's mass is taken at its centre
    (error inside a bin ignored, which is small next to the clipping and rounding error it compares).
    """

    name = "mse"

    def __init__(self, bins: int = 2048, qmax: int = 127, min_bin: int = 16) -> None:
        super().__init__(bins)
        self.qmax = qmax
        self.min_bin = min_bin

    def errors(self) -> tuple[np.ndarray, np.ndarray]:
        """(candidate amax values, mean squared error for each)."""
        hist = self.abs_hist().astype(np.float64)
        w = self.bin_width
        centers = (np.arange(self.bins) + 0.5) * w
        cands = np.arange(self.min_bin, self.bins + 1) * w
        err = np.empty(len(cands))
        total = hist.sum()
        for s in range(0, len(cands), 256):  # chunks bound the candidate x bin matrix to ~4 MB
            c = cands[s : s + 256, None]
            scale = c / self.qmax
            q = np.clip(np.round(centers[None, :] / scale), -self.qmax, self.qmax) * scale
            err[s : s + 256] = ((centers[None, :] - q) ** 2 * hist[None, :]).sum(axis=1) / total
        return cands, err

    def amax(self) -> float:
        self._check()
        if self.R == 0.0:
            return 0.0
        cands, err = self.errors()
        return min(float(cands[int(np.argmin(err))]), max(abs(self.min_val), abs(self.max_val)))


# Candidate methods, in the order ties are broken (the first, simplest one wins a tie).
PERCENTILES = (99.9, 99.99, 99.999)


def _clone(src: HistogramObserver, obs: HistogramObserver) -> HistogramObserver:
    """``obs`` with ``src``'s statistics: one histogram serves every method."""
    obs.min_val, obs.max_val, obs.count = src.min_val, src.max_val, src.count
    obs.R, obs.hist, obs._zeros = src.R, src.hist, src._zeros  # noqa: SLF001 — same class family
    return obs


class FixedObserver(Observer):
    """A range decided elsewhere (a search): ``range()`` and ``amax()`` return it."""

    def __init__(self, lo: float, hi: float, amax: float, method: str = "fixed") -> None:
        super().__init__()
        self.name = method
        self.min_val, self.max_val, self.count = float(lo), float(hi), 1
        self._amax = float(amax)

    def range(self) -> tuple[float, float]:
        return self.min_val, self.max_val

    def amax(self) -> float:
        return self._amax


class SearchObserver(HistogramObserver):
    """One histogram, every method's candidate range; alone it picks by the tensor's own error.

    ``candidates(symmetric)`` -> {method: (lo, hi)}; symmetric candidates are (-amax, amax) clipped to the
    observed range, as the other observers apply an amax. ``range()`` / ``amax()`` pick the candidate with the
    least mean squared error of the tensor on its own grid (asymmetric / symmetric int8), from the histogram.
    """

    name = "search"

    def __init__(self, bins: int = 2048) -> None:
        super().__init__(bins)

    def candidates(self, symmetric: bool) -> dict[str, tuple[float, float]]:
        self._check()
        out: dict[str, tuple[float, float]] = {"minmax": (self.min_val, self.max_val)}
        if self.R == 0.0:
            return out
        views: dict[str, HistogramObserver] = {
            **{f"percentile{p:g}": PercentileObserver(p, self.bins) for p in PERCENTILES},
            "entropy": EntropyObserver(self.bins),
            "mse": MseObserver(self.bins),
        }
        for name, view in views.items():
            _clone(self, view)
            if symmetric:
                a = view.amax()
                out[name] = (max(self.min_val, -a), min(self.max_val, a))
            else:
                out[name] = view.range()
        return out

    def _hist_centres(self) -> tuple[np.ndarray, np.ndarray]:
        w = self.bin_width
        centres = (np.arange(2 * self.bins) - self.bins + 0.5) * w
        hist = self.hist.astype(np.float64)
        hist[self.bins] += self._zeros
        return centres, hist

    def _pick(self, symmetric: bool) -> tuple[float, float]:
        cands = self.candidates(symmetric)
        if self.R == 0.0:
            return cands["minmax"]
        centres, hist = self._hist_centres()
        best, best_err = "minmax", math.inf
        for name, (lo, hi) in cands.items():
            err = float((hist * (fake_quant(centres, lo, hi, symmetric) - centres) ** 2).sum())
            if err < best_err:
                best, best_err = name, err
        return cands[best]

    def range(self) -> tuple[float, float]:
        return self._pick(symmetric=False)

    def amax(self) -> float:
        lo, hi = self._pick(symmetric=True)
        return max(abs(lo), abs(hi))


def grid(lo: float, hi: float, symmetric: bool, dtype: str = "int8") -> tuple[float, int, int, int]:
    """(scale, zero point, qmin, qmax) of the int8 grid a range gives, exactly as the observers derive it."""
    obs = FixedObserver(lo, hi, max(abs(lo), abs(hi)))
    if symmetric:
        return obs.symmetric(127), 0, -127, 127
    scale, zp = obs.asymmetric(dtype)
    qmin, qmax = QRANGES[dtype]
    return scale, zp, qmin, qmax


def fake_quant(x: Any, lo: float, hi: float, symmetric: bool, dtype: str = "int8") -> Any:
    """Quantize-dequantize ``x`` (numpy or torch) on the grid of (lo, hi), round half to even as ONNX does."""
    scale, zp, qmin, qmax = grid(lo, hi, symmetric, dtype)
    if isinstance(x, torch.Tensor):
        return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale
    return (np.clip(np.rint(x / scale) + zp, qmin, qmax) - zp) * scale



class ObserverKind(StrEnum):
    """The range observers ``--observer`` names (``OBSERVERS``: the class of each)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"
    SEARCH = "search"  # every method's range a candidate, judged per tensor (bottlefit.calibration.search)


OBSERVERS: dict[ObserverKind, type[Observer]] = {
    ObserverKind.MINMAX: MinMaxObserver,
    ObserverKind.PERCENTILE: PercentileObserver,
    ObserverKind.ENTROPY: EntropyObserver,
    ObserverKind.MSE: MseObserver,
    ObserverKind.SEARCH: SearchObserver,
}


def make_observer(name: str, **kw: Any) -> Observer:
    """An observer by name: minmax | percentile | entropy | mse | search; keyword arguments go to its constructor."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise UserError(
            f"unknown calibration method {name!r}; choose one of: {', '.join(OBSERVERS)}"
        ) from None
    return cls(**kw)


Feed = Callable[[str, ArrayLike], None]


def calibrate_two_pass(observer: str, run_pass: Callable[[Feed], None], **observer_kw: Any) -> dict[str, Observer]:
    """TensorRT's two-pass calibration: one ``observer`` (by name, ``observer_kw`` to its constructor) per key.

    ``run_pass(feed)`` runs the calibration data once and calls ``feed(key, tensor)`` for every tensor to
    observe. Histogram observers need the data twice: a first pass into min/max observers fixes each
    histogram's range (``HistogramObserver.prime``), then the second fills the histograms, so each spans
    exactly the final |max|. Other observers take a single pass. Keys keep first-seen order. An unknown
    observer name is a UserError before ``run_pass`` is called.
    """
    make_observer(observer, **observer_kw)  # validate the name and arguments before any pass
    observers: dict[str, Observer] = {}
    if issubclass(OBSERVERS[observer], HistogramObserver):
        first: dict[str, Observer] = {}

        def feed_minmax(key: str, x: ArrayLike) -> None:
            if key not in first:
                first[key] = MinMaxObserver()
            first[key].update(x)

        run_pass(feed_minmax)
        for key, mm in first.items():
            obs = make_observer(observer, **observer_kw)
            assert isinstance(obs, HistogramObserver)
            obs.prime(*mm.range())
            observers[key] = obs

    def feed(key: str, x: ArrayLike) -> None:
        if key not in observers:
            observers[key] = make_observer(observer, **observer_kw)
        observers[key].update(x)

    run_pass(feed)
    return observers
