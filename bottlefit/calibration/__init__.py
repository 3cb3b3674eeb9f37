"""Calibration: preprocessed calibration sets and the range observers that turn them into int8 parameters."""

from bottlefit.calibration.dataset import CalibrationSet, decode_rgb, load_image
from bottlefit.calibration.observers import (
    OBSERVERS,
    EntropyObserver,
    FixedObserver,
    HistogramObserver,
    MinMaxObserver,
    MseObserver,
    Observer,
    PercentileObserver,
    SearchObserver,
    calibrate_two_pass,
    make_observer,
)
from bottlefit.calibration.preprocessing import preprocess

__all__ = [
    "OBSERVERS",
    "CalibrationSet",
    "EntropyObserver",
    "FixedObserver",
    "HistogramObserver",
    "MinMaxObserver",
    "MseObserver",
    "Observer",
    "PercentileObserver",
    "SearchObserver",
    "calibrate_two_pass",
    "decode_rgb",
    "load_image",
    "make_observer",
    "preprocess",
]
