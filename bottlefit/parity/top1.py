"""The top-1 agreement gate: is an artifact's agreement with PyTorch fp32 evidence of a damaged artifact?

A plain "agreement >= threshold" on a few images is decided by near-ties: one flip of an image whose two best
classes were 0.01 apart fails 16 images at 0.95, whatever the artifact. The rule (bottlefit.parity.tolerances
documents it for users; its constants live there):

1. **Near-tie flips are excused.** The artifact's error reach on image i is r_i = max_k d_ik - min_k d_ik with
   d = artifact logits - fp32 logits: the most its error moved the gap between any two classes. The set's reach is
   the median of r_i over all images (one image's own error never sets it: judging a flip by its own image's
   error would excuse every flip, since a flip means that error exceeded the margin), scaled down to what the
   artifact's error gates allow when it exceeds them (a damaged artifact's large error excuses nothing). A flip
   whose fp32 margin (top-1 logit minus the runner-up) is within ``NEAR_TIE_REACH`` times that reach is a
   near-tie: error of the size the artifact makes on a typical image moves it. Every other flip is decisive.
2. **A one-sided binomial bound on the rest.** Decisive flips count as disagreements; the artifact fails only
   when the data show at confidence ``TOP1_CONFIDENCE`` that its agreement is below the threshold: the one-sided
   Clopper-Pearson upper bound on the agreement rate, from n images, is under the threshold. With 16 images and
   0.95 that allows 2 decisive flips and fails 3; with 200 images it fails 16.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bottlefit.parity.tolerances import NEAR_TIE_REACH, TOP1_CONFIDENCE, Tolerance


@dataclass(frozen=True)
class Top1Agreement:
    """What the rule counted on one artifact's logits (recorded in report.json as the check's ``detail``)."""

    images: int
    flips: int  # images whose top-1 class differs from fp32's
    near_tie_flips: int  # flips excused: fp32 margin <= near_tie_margin
    near_tie_margin: float  # NEAR_TIE_REACH x the set's median error reach (after the gates' scaling)
    median_reach: float  # the set's median error reach on the logits, as measured
    gate_scale: float  # <= 1: the measured error scaled to what the artifact's error gates allow
    threshold: float | None  # the agreement the artifact must not be shown to fall below; None: not gated
    confidence: float
    upper_bound: float  # one-sided Clopper-Pearson upper bound on the agreement, decisive flips counted
    passed: bool

    @property
    def decisive_flips(self) -> int:
        return self.flips - self.near_tie_flips

    @property
    def agreement(self) -> float:
        """The plain fraction of images whose top-1 agrees (the check's value)."""
        return (self.images - self.flips) / self.images if self.images else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decisive_flips": self.decisive_flips}

    def line(self) -> str:
        """One line for a person: what was counted and why the check passed or failed."""
        bound = "" if self.threshold is None else (f"; agreement upper bound {self.upper_bound:.4g} at "
                                                   f"{100 * self.confidence:g}% {'>=' if self.passed else '<'} "
                                                   f"{self.threshold:g}")
        return (f"{self.flips} of {self.images} images flipped: {self.near_tie_flips} near-tie (fp32 margin <= "
                f"{self.near_tie_margin:.3g}), {self.decisive_flips} decisive{bound}")


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (no underflow for thousands of images)."""
    if k >= n or p <= 0.0:
        return 1.0
    if k < 0 or p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
             for j in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def upper_bound(agree: int, n: int, confidence: float = TOP1_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen ``agree`` times in ``n``: the largest p under which
    seeing at most ``agree`` still has probability >= 1 - confidence."""
    if n == 0 or agree >= n:
        return 1.0
    alpha, lo, hi = 1.0 - confidence, agree / n, 1.0
    for _ in range(60):  # bisection: P(X <= agree | p) falls as p grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(agree, n, mid) >= alpha else (lo, mid)
    return lo


def consistent_with(agree: int, n: int, threshold: float, confidence: float = TOP1_CONFIDENCE) -> bool:
    """Whether ``agree`` of ``n`` is consistent with an agreement rate of at least ``threshold`` (the upper bound
    reaches it), decided on the binomial itself rather than the bisected bound."""
    return n == 0 or agree >= n or binomial_cdf(agree, n, threshold) >= 1.0 - confidence


def gate_scale(values: dict[str, float], tols: dict[str, Tolerance]) -> float:
    """The factor (<= 1) that brings the artifact's measured error down to the largest its error gates allow, in
    amplitude: logit error grows in proportion to the error that causes it (first order), so the near-tie band
    of an artifact that breaks a gate is the one an artifact at that gate's limit would have."""
    scale = 1.0
    for metric, value in values.items():
        tol = tols.get(metric)
        if tol is None or metric == "logits.top1_agreement" or tol.ok(value) or math.isnan(value):
            continue
        if metric.endswith(".sqnr_db"):  # dB: an amplitude ratio of 10^(dB/20)
            scale = min(scale, 0.0 if math.isinf(value) else 10.0 ** ((value - tol.value) / 20.0))
        elif metric.endswith(".cosine"):  # 1 - cosine grows as the square of the error's relative amplitude
            scale = min(scale, math.sqrt(max(1.0 - tol.value, 0.0) / (1.0 - value)))
        elif tol.op == "<=" and value > 0:  # absolute errors
            scale = min(scale, tol.value / value)
    return max(scale, 0.0)


def judge(ref_logits: np.ndarray, got_logits: np.ndarray, threshold: float | None, *, scale: float = 1.0,
          confidence: float = TOP1_CONFIDENCE) -> Top1Agreement:
    """The rule (module docstring) on ``got_logits`` against ``ref_logits`` (images x classes). ``threshold``
    None: counted, not gated (passes). ``scale``: :func:`gate_scale`."""
    ref = np.asarray(ref_logits, dtype=np.float64).reshape(len(ref_logits), -1)
    got = np.asarray(got_logits, dtype=np.float64).reshape(len(got_logits), -1)
    n = ref.shape[0]
    flipped = ref.argmax(1) != got.argmax(1)
    d = got - ref
    reach = d.max(1) - d.min(1) if n else np.zeros(0)
    median = float(np.median(reach)) if n else 0.0
    band = NEAR_TIE_REACH * median * scale
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((n, 2))
    margin = top2[:, 1] - top2[:, 0]
    near = int(np.sum(flipped & (margin <= band)))
    flips = int(np.sum(flipped))
    agree = n - (flips - near)
    passed = threshold is None or consistent_with(agree, n, threshold, confidence)
    return Top1Agreement(n, flips, near, band, median, scale, threshold, confidence, upper_bound(agree, n, confidence),
                         passed)
