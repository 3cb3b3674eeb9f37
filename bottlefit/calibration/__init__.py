"""Calibration: preprocessed calibration sets and the range observers that turn them into int8 parameters."""

from bottlefit.calibration.dataset import CalibrationSet, decode_rgb, load_image, preprocess
from bottlefit.calibration.observers import (
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MseObserver,
    Observer,
    PercentileObserver,
    collect_ranges,
    make_observer,
)

__all__ = [
    "OBSERVERS",
    "CalibrationSet",
    "EntropyObserver",
    "HistogramObserver",
    "MinMaxObserver",
    "MseObserver",
    "Observer",
    "PercentileObserver",
    "collect_ranges",
    "decode_rgb",
    "load_image",
    "make_observer",
    "preprocess",
]
