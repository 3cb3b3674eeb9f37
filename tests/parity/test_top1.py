"""The top-1 agreement gate (bottlefit.parity.top1): one near-tie flip among few images cannot fail an artifact,
decisive flips and damaged heads still do, and report.json says what was counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bottlefit.cli import main
from bottlefit.parity import top1
from bottlefit.parity.tolerances import NEAR_TIE_REACH, tolerances_for

N, K = 16, 10


def logits(near_tie: tuple[int, ...] = ()) -> np.ndarray:
    """16 images x 10 classes: image i's top-1 is class i % 10 at 5.0, its runner-up class (i + 1) % 10 at 2.0
    (margin 3.0), the rest at 0.0; a near-tie image's runner-up sits at 4.99 (margin 0.01)."""
    ref = np.zeros((N, K))
    for i in range(N):
        ref[i, i % K] = 5.0
        ref[i, (i + 1) % K] = 4.99 if i in near_tie else 2.0
    return ref


def noisy(ref: np.ndarray, amount: float = 0.1, hit: dict[int, float] | None = None) -> np.ndarray:
    """The artifact's logits: every image's top-1 class lowered and its runner-up raised by ``amount`` (error reach
    2 x amount on every image), and each image in ``hit`` pushed that much further towards its runner-up."""
    got = ref.copy()
    for i in range(N):
        extra = (hit or {}).get(i, 0.0)
        got[i, i % K] -= amount + extra
        got[i, (i + 1) % K] += amount + extra
    return got


def test_one_near_tie_flip_in_16_images_passes() -> None:
    ref = logits(near_tie=(3,))
    got = noisy(ref)  # reach 0.2 on every image: the 0.01 margin flips, the 3.0 ones do not
    tol = tolerances_for("head.int8.onnx", "int8", {}, trained=True)["logits.top1_agreement"]
    assert not tol.ok(15 / 16)  # the plain rule failed this artifact: 0.9375 < 0.95
    t = top1.judge(ref, got, tol.value)
    assert (t.images, t.flips, t.near_tie_flips, t.decisive_flips, t.agreement) == (16, 1, 1, 0, 0.9375)
    assert t.median_reach == pytest.approx(0.2) and t.near_tie_margin == pytest.approx(NEAR_TIE_REACH * 0.2)
    assert t.upper_bound == 1.0 and t.passed
    assert "1 of 16 images flipped: 1 near-tie" in t.line()


@pytest.mark.parametrize(("decisive", "passed", "bound"), [(1, True, 0.95 ** (1 / 16)),  # 1 - p^16 = 0.05
                                                            (2, True, 0.977321), (3, False, 0.946854),
                                                            (5, False, 0.867889)])
def test_decisive_flips_count_against_a_binomial_bound(decisive: int, passed: bool, bound: float) -> None:
    """A flip of a 3.0 margin, where the set's error reaches 0.2, is decisive, however large that one image's own
    error (judging a flip by its own image's error would excuse every flip). 16 images at 0.95: 2 pass, 3 fail."""
    ref = logits()
    got = noisy(ref, hit={i: 3.0 for i in range(decisive)})
    t = top1.judge(ref, got, 0.95)
    assert (t.flips, t.near_tie_flips, t.decisive_flips) == (decisive, 0, decisive)
    assert t.median_reach == pytest.approx(0.2)
    assert t.passed is passed
    assert t.upper_bound == pytest.approx(bound, abs=1e-6)


def test_a_damaged_head_fails_where_its_error_breaks_the_gates() -> None:
    """Every image's error is 10-20x a healthy one (reach 2.0 or 4.0, median 3.0): half of the 3.0 margins flip.
    Its own measured error would call them near-ties (band 6.0); the artifact's error gates (bottleneck SQNR 20 dB
    against the trained 32 dB floor) allow a quarter of that error, so the band is 2 x 3.0 x 0.251 = 1.5 < 3.0:
    eight decisive flips of 16."""
    ref = logits()
    got = noisy(ref, amount=1.0, hit={i: 1.0 for i in range(0, N, 2)})  # every other image pushed over its margin
    tols = tolerances_for("head.int8.onnx", "int8", {}, trained=True, scheme="asymmetric")
    scale = top1.gate_scale({"bottleneck.sqnr_db": 20.0, "bottleneck.cosine": 0.9995}, tols)
    assert scale == pytest.approx(10 ** (-12 / 20))
    t = top1.judge(ref, got, 0.95, scale=scale)
    assert (t.flips, t.near_tie_flips, t.decisive_flips) == (8, 0, 8)
    assert t.median_reach == pytest.approx(3.0) and t.near_tie_margin == pytest.approx(2 * 3.0 * scale)
    assert not t.passed and t.upper_bound == pytest.approx(0.721397, abs=1e-6)
    assert top1.judge(ref, got, 0.95).passed  # what the gates' scaling is for: its own error excuses them all


def test_gate_scale_is_the_amplitude_a_gate_allows() -> None:
    int8 = tolerances_for("h", "int8", {}, trained=True, scheme="asymmetric")  # cosine 0.999, SQNR 32 dB
    assert top1.gate_scale({"bottleneck.sqnr_db": 35.0, "bottleneck.cosine": 0.9995}, int8) == 1.0  # healthy
    assert top1.gate_scale({"bottleneck.sqnr_db": 26.0}, int8) == pytest.approx(10 ** (-6 / 20))
    assert top1.gate_scale({"bottleneck.cosine": 0.996}, int8) == pytest.approx(0.5)
    assert top1.gate_scale({"bottleneck.sqnr_db": float("-inf")}, int8) == 0.0
    fp32 = tolerances_for("t", "fp32", {})
    assert top1.gate_scale({"logits.max_abs_error": 4e-3, "logits.top1_agreement": 0.5}, fp32) == pytest.approx(0.25)


def test_fp32_excuses_only_flips_within_float_rounding() -> None:
    """fp32's tolerance is 1.0: a flip of a tie closer than the artifact's rounding passes, any other fails."""
    ref = logits()
    ref[5, 6] = ref[5, 5] - 1e-7  # a tie to float rounding
    got = noisy(ref, amount=1e-6)
    t = top1.judge(ref, got, 1.0)
    assert (t.flips, t.near_tie_flips, t.passed) == (1, 1, True)
    got = noisy(ref, amount=1e-6, hit={9: 3.0})
    t = top1.judge(ref, got, 1.0)
    assert (t.flips, t.near_tie_flips, t.decisive_flips, t.passed) == (2, 1, 1, False)


def test_binomial_bound_matches_clopper_pearson() -> None:
    """Exact numbers (scipy.stats.beta.ppf(0.95, x + 1, n - x)) and where 0.95 fails for a few image counts."""
    assert top1.upper_bound(13, 16) == pytest.approx(0.9468540155, abs=1e-9)
    assert top1.upper_bound(184, 200) == pytest.approx(0.9491782830, abs=1e-9)
    assert top1.upper_bound(16, 16) == 1.0 and top1.upper_bound(0, 0) == 1.0
    first_failing = {n: next(k for k in range(n + 1) if not top1.consistent_with(n - k, n, 0.95))
                     for n in (4, 16, 200, 1000)}
    assert first_failing == {4: 2, 16: 3, 200: 16, 1000: 63}
    assert not top1.consistent_with(15, 16, 1.0) and top1.consistent_with(0, 16, 0.0)
    assert top1.binomial_cdf(2, 16, 0.05) == pytest.approx(0.9570621, abs=1e-7)


def test_export_records_what_the_rule_counted(tmp_path: Path) -> None:
    """The untrained mini ResNet's int8 head under the trained 0.95 gate: image 13 of the 16 built-in held-out
    images (fp32 margin 0.014) flips, the set's median reach is 0.17. The plain rule failed it (exit 1, 0.9375);
    the near-tie is excused and report.json says so."""
    out = tmp_path / "out"
    rc = main(["export", "--untrained", "--arch", "mini_resnet", "--target", "onnx", "--int8", "--out", str(out),
               "--parity-count", "16", "--calib-count", "32", "--emulate", "none", "--quiet",
               "--tolerance", "head.int8.onnx:logits.top1_agreement=0.95"])
    assert rc == 0
    report = json.loads((out / "onnx" / "report.json").read_text())
    (check,) = [c for c in report["checks"]
                if c["artifact"] == "head.int8.onnx" and c["metric"] == "logits.top1_agreement"]
    d = check["detail"]
    assert (check["value"], check["tolerance"], check["passed"]) == (0.9375, 0.95, True)
    assert (d["images"], d["flips"], d["near_tie_flips"], d["decisive_flips"], d["upper_bound"]) == (16, 1, 1, 0, 1.0)
    assert 0.1 < d["median_reach"] < 0.25 and d["near_tie_margin"] == pytest.approx(2 * d["median_reach"])
    assert d["gate_scale"] == 1.0 and d["threshold"] == 0.95 and d["confidence"] == 0.95
    assert all("detail" not in c for c in report["checks"] if c["metric"] != "logits.top1_agreement")
    assert "1 of 16 images flipped: 1 near-tie" in (out / "onnx" / "report.md").read_text()
