"""Observers against hand-computed ranges, and two-pass calibration over a small real module."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from bottlefit.calibration import (
    EntropyObserver,
    MinMaxObserver,
    MseObserver,
    PercentileObserver,
    calibrate_two_pass,
    make_observer,
)
from bottlefit.calibration.observers import Feed
from bottlefit.errors import UserError


def f32(v: float) -> float:
    return float(np.float32(v))


def outlier_tensor(n: int = 1_000_000, outlier: float = 30.0, k: int = 3) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    x[:k] = outlier
    return x


def test_minmax_exact_across_batches_and_tensor_input() -> None:
    o = MinMaxObserver()
    o.update(np.array([[0.5, -1.25], [2.0, 0.0]], np.float32))
    o.update(torch.tensor([3.5, -0.75]))
    assert o.range() == (-1.25, 3.5)
    assert o.amax() == 3.5
    assert o.symmetric() == f32(3.5 / 127)
    # int8: scale = (3.5 + 1.25) / 255; zp = round(-128 + 1.25 / scale) = round(-60.89...) = -61
    s, zp = o.asymmetric("int8")
    assert s == f32(4.75 / 255) and zp == -61
    # uint8: zp = round(0 + 1.25 / scale) = round(67.10...) = 67
    s, zp = o.asymmetric("uint8")
    assert s == f32(4.75 / 255) and zp == 67


def test_asymmetric_range_is_widened_to_include_zero() -> None:
    pos = MinMaxObserver()
    pos.update(np.array([1.0, 5.1], np.float32))  # ReLU-like: lo becomes 0
    s, zp = pos.asymmetric("uint8")
    assert s == f32(float(np.float32(5.1)) / 255) and zp == 0
    s, zp = pos.asymmetric("int8")
    assert zp == -128
    neg = MinMaxObserver()
    neg.update(np.array([-4.0, -2.0], np.float32))  # hi becomes 0: zero point at the top
    s, zp = neg.asymmetric("uint8")
    assert s == f32(4.0 / 255) and zp == 255
    zero = MinMaxObserver()
    zero.update(np.zeros(4, np.float32))
    assert zero.symmetric() == 1.0 and zero.asymmetric("int8") == (1.0, 0)
    with pytest.raises(ValueError, match="dtype"):
        pos.asymmetric("int4")


def test_no_data_and_non_finite_are_errors() -> None:
    with pytest.raises(ValueError, match="no data"):
        MinMaxObserver().range()
    with pytest.raises(ValueError, match="non-finite"):
        EntropyObserver().update(np.array([1.0, np.nan], np.float32))


def test_percentile_on_arange() -> None:
    x = np.arange(10_000, dtype=np.float32)  # 0..9999, so the p-th percentile of |x| is ~ p% of 10000
    o = PercentileObserver(percentile=99.0)
    o.update(x)
    assert o.amax() == pytest.approx(9900.0, abs=5.0)  # within one bin (9999 / 2048 = 4.9)
    lo, hi = o.range()
    assert lo == pytest.approx(100.0, abs=5.0) and hi == pytest.approx(9900.0, abs=5.0)
    # Symmetric data: both tails and |x|. 1% of |x| lies beyond 4950 (0.5% in each tail).
    s = PercentileObserver(percentile=99.0)
    s.update(np.arange(-4999, 5000, dtype=np.float32))
    assert s.amax() == pytest.approx(4950.0, abs=5.0)
    lo, hi = s.range()
    assert lo == pytest.approx(-4900.0, abs=5.0) and hi == pytest.approx(4900.0, abs=5.0)
    assert s.symmetric() == f32(s.amax() / 127)


def test_percentile_100_is_the_max() -> None:
    o = PercentileObserver(percentile=100.0)
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    o.update(x)
    assert o.amax() == pytest.approx(float(np.abs(x).max()), rel=1e-6)


def test_histogram_grows_across_batches_exactly() -> None:
    a = np.linspace(-1.0, 1.0, 4001, dtype=np.float32)
    b = np.linspace(-3.5, 3.5, 7001, dtype=np.float32)
    grown = PercentileObserver(percentile=99.0)
    grown.update(a)
    grown.update(b)  # R doubles 1 -> 2 -> 4, merging bin pairs
    assert grown.R == 4.0
    assert int(grown.hist.sum()) == a.size + b.size
    assert (grown.min_val, grown.max_val) == (-3.5, 3.5)
    once = PercentileObserver(percentile=99.0)
    once.update(np.concatenate([a, b]))
    # Same data binned directly over [-3.5, 3.5]: the percentiles agree within the coarser bin (4 / 2048).
    assert grown.amax() == pytest.approx(once.amax(), abs=4 / 2048 + 1e-6)
    # A histogram started on all-zero batches keeps those zeros once the range appears.
    z = MseObserver()
    z.update(np.zeros(10, np.float32))
    z.update(np.array([1.0], np.float32))
    assert int(z.abs_hist()[0]) == 10 and int(z.abs_hist().sum()) == 11


def test_prime_fixes_the_histogram_range() -> None:
    o = EntropyObserver()
    o.prime(-2.0, 8.0)
    o.update(np.array([1.0, -2.0], np.float32))
    o.update(np.array([8.0], np.float32))
    assert o.R == 8.0 and o.bin_width == 8.0 / 2048
    h = o.abs_hist()
    assert h[256] == 1 and h[512] == 1 and h[2047] == 1  # 1.0, |-2.0|, 8.0 (last bin takes the edge)
    with pytest.raises(RuntimeError):
        o.prime(0.0, 1.0)


def test_entropy_uniform_keeps_the_whole_range() -> None:
    # Uniform over the histogram: every clipped candidate piles mass into P's last bin, which Q smears;
    # only i = 2048 gives Q == P (KL 0 up to sampling noise), so amax = (2048 + 0.5) * max / 2048.
    x = np.random.default_rng(0).uniform(0.0, 1.0, 400_000).astype(np.float32)
    o = EntropyObserver()
    o.update(x)
    cands, kl = o.divergences()
    assert cands[0] == 128 and cands[-1] == 2048
    assert kl[-1] < 0.005 and int(np.argmin(kl)) == len(kl) - 1
    assert o.amax() == pytest.approx(2048.5 * float(x.max()) / 2048, rel=1e-6)


def test_entropy_clips_outliers_close_to_the_bulk() -> None:
    x = outlier_tensor(n=200_000, outlier=100.0, k=5)
    o = EntropyObserver()
    o.update(x)
    bulk = float(np.abs(x[5:]).max())  # ~4.6
    # 128 bins is the smallest candidate: (128 + 0.5) * 100 / 2048 = 6.27 covers the whole bulk.
    assert o.amax() == pytest.approx(128.5 * 100.0 / 2048)
    assert bulk < o.amax() < 0.1 * float(x.max())
    lo, hi = o.range()
    assert lo == float(x.min()) and hi == o.amax()  # the symmetric threshold applied to the range


def test_mse_clips_rare_outliers_and_keeps_uniform_data() -> None:
    # 3 values at 30 among 1e6 N(0,1): clipping at a costs ~3 (30 - a)^2 / 1e6, rounding ~(a/127)^2 / 12;
    # the sum is smallest near a = 11.
    o = MseObserver()
    o.update(outlier_tensor())
    assert 9.0 < o.amax() < 13.0
    u = MseObserver()
    x = np.random.default_rng(0).uniform(-1.0, 1.0, 200_000).astype(np.float32)
    u.update(x)
    assert u.amax() == pytest.approx(1.0, abs=0.01)  # uniform: clipping never pays
    cands, err = u.errors()
    assert err[-1] < err[len(err) // 2]


def test_asymmetric_from_clipped_range_matches_hand_computation() -> None:
    o = MseObserver()
    x = outlier_tensor()
    o.update(x)
    lo, hi = o.range()
    amax = o.amax()
    assert (lo, hi) == (float(x.min()), amax)
    s, zp = o.asymmetric("uint8")
    assert s == f32((hi - lo) / 255)
    assert zp == int(np.rint(-lo / s))


def test_make_observer_registry() -> None:
    assert isinstance(make_observer("minmax"), MinMaxObserver)
    p = make_observer("percentile", percentile=99.9)
    assert isinstance(p, PercentileObserver) and p.percentile == 99.9
    assert isinstance(make_observer("entropy"), EntropyObserver)
    assert isinstance(make_observer("mse"), MseObserver)
    with pytest.raises(UserError, match="minmax, percentile, entropy, mse"):
        make_observer("kl")


def batches_through(model: nn.Module, data: list[np.ndarray], passes: list[int]) -> Callable[[Feed], None]:
    """A ``run_pass`` feeding "input" and every child's output; counts its calls in ``passes``."""

    def run_pass(feed: Feed) -> None:
        passes.append(1)
        for b in data:
            x = torch.from_numpy(b)
            feed("input", x)
            with torch.no_grad():
                for name, child in model.named_children():
                    x = child(x)
                    feed(name, x)

    return run_pass


def test_calibrate_two_pass_minmax_is_one_exact_pass() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    data = [np.random.default_rng(i).standard_normal((2, 3, 8, 8)).astype(np.float32) for i in range(3)]
    passes: list[int] = []
    obs = calibrate_two_pass("minmax", batches_through(model, data, passes))
    assert len(passes) == 1
    assert list(obs) == ["input", "0", "1", "2"]  # first-seen order
    assert all(type(o) is MinMaxObserver for o in obs.values())
    x = torch.from_numpy(np.concatenate(data))
    with torch.no_grad():
        conv = model[0](x)
        out = model(x)
    assert obs["input"].range() == (float(x.min()), float(x.max()))
    assert obs["0"].range() == pytest.approx((float(conv.min()), float(conv.max())), abs=1e-6)
    assert obs["1"].range() == pytest.approx((0.0, float(conv.max())), abs=1e-6)
    assert obs["2"].range() == pytest.approx((float(out.min()), float(out.max())), abs=1e-6)


def test_calibrate_two_pass_primes_histograms_from_a_minmax_pass() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    rngs = [np.random.default_rng(i) for i in range(3)]
    data = [r.standard_normal((2, 3, 4, 4)).astype(np.float32) * (i + 1) for i, r in enumerate(rngs)]
    passes: list[int] = []
    obs = calibrate_two_pass("entropy", batches_through(model, data, passes))
    assert len(passes) == 2
    e = obs["0"]
    assert isinstance(e, EntropyObserver)
    with torch.no_grad():
        y = model[0](torch.from_numpy(np.concatenate(data)))
    amax = float(y.abs().max())
    # Primed by the min/max pass: the histogram spans exactly the final |max|, as TensorRT's does.
    assert e.R == pytest.approx(amax, rel=1e-6)
    assert int(e.hist.sum()) == y.numel()
    # Unprimed, the same batches grow R by doubling past the final |max|.
    grown = EntropyObserver()
    with torch.no_grad():
        for b in data:
            grown.update(model[0](torch.from_numpy(b)))
    assert grown.R > e.R
    pct = calibrate_two_pass("percentile", batches_through(model, data, []), percentile=100.0)
    assert isinstance(pct["1"], PercentileObserver)
    assert pct["1"].amax() == pytest.approx(float(torch.relu(y).max()), rel=1e-5)


def test_calibrate_two_pass_rejects_bad_observers_before_any_pass() -> None:
    passes: list[int] = []
    run_pass = batches_through(nn.Sequential(nn.ReLU()), [np.zeros((1, 3), np.float32)], passes)
    with pytest.raises(UserError, match="choose one of"):
        calibrate_two_pass("bogus", run_pass)
    with pytest.raises(ValueError, match="percentile"):
        calibrate_two_pass("percentile", run_pass, percentile=0.0)
    assert passes == []


def test_entropy_is_not_collapsed_by_the_zeros_of_a_relu() -> None:
    # 90% exact zeros (a ReLU/max-pool output) + |N(0,1)|: without neutralizing the zero bin the KL search
    # picked 0.565 (clipping 57% of the non-zero values); measured now 3.6 of a 4.53 maximum.
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(0, 1, 200_000))
    x[rng.random(len(x)) < 0.9] = 0
    o = make_observer("entropy")
    o.update(x)
    nonzero = x[x > 0]
    assert 3.0 < o.amax() <= x.max() + o.bin_width
    assert np.mean(nonzero > o.amax()) < 0.002
