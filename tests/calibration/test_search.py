"""The per-tensor range search: candidates from one histogram, judged on the tensor or on the layer reading it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bottlefit.calibration.observers import FixedObserver, SearchObserver, fake_quant, make_observer
from bottlefit.calibration.search import LayerProbe, choose, search
from bottlefit.errors import UserError
from bottlefit.pipeline.options import CalibrationOptions

METHODS = {"minmax", "percentile99.9", "percentile99.99", "percentile99.999", "entropy", "mse"}


def heavy(n: int = 50_000, seed: int = 0) -> np.ndarray:
    """Student-t (3 dof): the heavy tails that make min/max waste the int8 grid."""
    return np.random.default_rng(seed).standard_t(3, size=n).astype(np.float32)


def observed(x: np.ndarray) -> SearchObserver:
    obs = SearchObserver()
    obs.prime(float(x.min()), float(x.max()))
    obs.update(x)
    return obs


def mse(x: np.ndarray, lo: float, hi: float, symmetric: bool) -> float:
    return float(np.mean((fake_quant(x.astype(np.float64), lo, hi, symmetric) - x) ** 2))


def test_candidates_cover_every_method_from_one_histogram() -> None:
    x = heavy()
    obs = observed(x)
    for symmetric in (True, False):
        cands = obs.candidates(symmetric)
        assert set(cands) == METHODS
        assert cands["minmax"] == (float(x.min()), float(x.max()))
        for lo, hi in cands.values():
            assert x.min() <= lo < 0 < hi <= x.max()
    # the percentiles clip progressively less
    c = obs.candidates(True)
    assert c["percentile99.9"][1] < c["percentile99.99"][1] < c["percentile99.999"][1]


@pytest.mark.parametrize("symmetric", [True, False])
def test_own_pick_has_the_least_error_of_the_candidates(symmetric: bool) -> None:
    x = heavy()
    obs = observed(x)
    lo, hi = (-obs.amax(), obs.amax()) if symmetric else obs.range()
    lo, hi = max(lo, float(x.min())), min(hi, float(x.max()))
    errs = {k: mse(x, a, b, symmetric) for k, (a, b) in obs.candidates(symmetric).items()}
    picked = mse(x, lo, hi, symmetric)
    # judged on the histogram's bin centres: within 2% of the best candidate measured on the data itself
    assert picked <= 1.02 * min(errs.values())
    if symmetric:  # heavy tails: clipping pays (measured 0.89 of min/max's error)
        assert picked < 0.95 * errs["minmax"]


def test_uniform_data_keeps_its_full_range() -> None:
    x = np.random.default_rng(1).uniform(-3, 3, 50_000).astype(np.float32)
    obs = observed(x)
    assert obs.amax() == pytest.approx(float(np.abs(x).max()), rel=0.01)


def test_choose_judges_a_range_by_the_conv_reading_it() -> None:
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_t(3, size=(4, 8, 12, 12)), 0).astype(np.float32)  # a ReLU output
    probe = LayerProbe(rng.standard_normal((6, 8, 3, 3)).astype(np.float32), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    obs = observed(x.ravel())
    fixed, choice = choose(obs, x, symmetric=False, probe=probe)
    assert choice.judged_by == "layer" and set(choice.errors_db) == METHODS
    assert choice.errors_db[choice.method] == max(choice.errors_db.values())
    assert (fixed.range(), fixed.name) == ((choice.lo, choice.hi), choice.method)
    # the reported SQNR is the conv output's, recomputed here
    ref = probe(torch.from_numpy(x))
    got = probe(fake_quant(torch.from_numpy(x), choice.lo, choice.hi, False))
    sq = 10 * np.log10(float((ref.double() ** 2).sum()) / float(((got - ref).double() ** 2).sum()))
    assert sq == pytest.approx(choice.errors_db[choice.method], abs=1e-6)
    # the head's output can be judged by its worst image, as parity judges it
    _, worst = choose(obs, x, symmetric=False, worst_image=True)
    assert worst.judged_by == "tensor (worst image)" and worst.errors_db[worst.method] == max(worst.errors_db.values())
    # a tensor without samples falls back to the histogram's own pick; other observers pass through
    mm = make_observer("minmax")
    mm.update(x)
    out, choices = search({"a": obs, "b": mm}, {}, symmetric=True)
    assert out["b"] is mm and choices["a"].judged_by == "histogram" and list(out) == ["a", "b"]


def test_fixed_observer_derives_parameters_like_the_others() -> None:
    f = FixedObserver(-1.0, 3.0, 3.0, "mse")
    mm = make_observer("minmax")
    mm.update(np.array([-1.0, 3.0], dtype=np.float32))
    assert f.asymmetric("int8") == mm.asymmetric("int8") and f.symmetric() == mm.symmetric()
    assert f.name == "mse"


def test_search_is_an_observer_name_everywhere() -> None:
    assert isinstance(make_observer("search"), SearchObserver)
    assert CalibrationOptions(observer="search", equalize=True).equalize is True
    with pytest.raises(UserError, match="search"):
        make_observer("kl")
