"""The int8 gates of parity.tolerances: a healthy head of a trained model passes, damaged ones cannot."""

from __future__ import annotations

import numpy as np
import pytest

from bottlefit.calibration.observers import fake_quant, make_observer
from bottlefit.parity.metrics import cosine, sqnr_db
from bottlefit.parity.tolerances import SQNR_FLOORS, tolerances_for


def bottleneck(seed: int = 0) -> np.ndarray:
    """A trained-like bottleneck: 8 images x 4 channels of different spread, Laplacian (conv outputs)."""
    rng = np.random.default_rng(seed)
    spread = np.array([0.3, 0.6, 1.0, 1.7]).reshape(1, 4, 1, 1)
    return (rng.laplace(size=(8, 4, 5, 5)) * spread).astype(np.float32)


def int8_head(z: np.ndarray, symmetric: bool, scale_factor: float = 1.0) -> np.ndarray:
    """What an int8 head emits: z on the per-tensor grid the searched range gives (scaled by ``scale_factor``)."""
    obs = make_observer("search")
    obs.update(z)
    if symmetric:
        a = obs.amax() * scale_factor
        return fake_quant(z.astype(np.float64), -a, a, True).astype(np.float32)
    lo, hi = obs.range()
    return fake_quant(z.astype(np.float64), lo * scale_factor, hi * scale_factor, False).astype(np.float32)


def passes(z: np.ndarray, got: np.ndarray, scheme: str) -> bool:
    tols = tolerances_for("head.int8.onnx", "int8", {}, trained=True, scheme=scheme)
    values = {"bottleneck.cosine": cosine(z, got), "bottleneck.sqnr_db": sqnr_db(z, got)}
    return all(tols[m].ok(v) for m, v in values.items())


def test_trained_gates_are_tighter_and_per_scheme() -> None:
    """A trained model's int8 gates are stricter than random weights' on every metric (a value the trained gate
    passes passes the untrained one, not the reverse); its SQNR floor is its scheme's, the asymmetric one the
    stricter (asymmetric int8 spends no codes on an empty side); fp32's gates do not change; overrides win. Whether
    the floors' values catch damage: test_a_healthy_head_passes_and_damaged_heads_fail."""
    untrained = tolerances_for("a", "int8", {})
    for scheme in ("symmetric", "asymmetric"):
        trained = tolerances_for("a", "int8", {}, trained=True, scheme=scheme)
        assert set(trained) == set(untrained)
        for metric, gate in trained.items():
            assert untrained[metric].ok(gate.value) and not gate.ok(untrained[metric].value), (scheme, metric)
        assert trained["bottleneck.sqnr_db"].value == SQNR_FLOORS[scheme]
    assert SQNR_FLOORS["asymmetric"] > SQNR_FLOORS["symmetric"]
    assert tolerances_for("a", "fp32", {}, trained=True) == tolerances_for("a", "fp32", {})
    o = tolerances_for("a", "int8", {(None, "bottleneck.sqnr_db"): 20.0, ("a", "bottleneck.cosine"): 0.99},
                       trained=True, scheme="asymmetric")
    assert (o["bottleneck.sqnr_db"].value, o["bottleneck.cosine"].value) == (20.0, 0.99)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_a_healthy_head_passes_and_damaged_heads_fail(scheme: str) -> None:
    z = bottleneck()
    sym = scheme == "symmetric"
    healthy = int8_head(z, sym)
    assert passes(z, healthy, scheme), sqnr_db(z, healthy)  # measured 38.1 dB symmetric, 38.6 asymmetric
    damaged = {
        # (one bit lost, a grid twice as coarse, costs 6 dB: caught only where the head has < 6 dB of margin)
        "two bits lost (grid four times as coarse)": int8_head(z, sym, 4.0),
        "output range clipped to a third": int8_head(z, sym, 1 / 3),
        "one channel zeroed": np.where(np.arange(4).reshape(1, 4, 1, 1) == 1, 0.0, healthy),
        "zero point off by 3 steps": healthy + 3 * (float(np.abs(z).max()) / 127),
        "int16 saturation (sums clipped at a quarter)": np.clip(healthy, -0.25 * np.abs(z).max(),
                                                                 0.25 * np.abs(z).max()),
    }
    for what, got in damaged.items():
        assert not passes(z, got, scheme), f"{what}: {sqnr_db(z, got):.1f} dB, cosine {cosine(z, got):.5f}"
