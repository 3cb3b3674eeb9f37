"""Error metrics between a reference (PyTorch fp32) and an artifact's output."""

from __future__ import annotations

import numpy as np


def max_abs_error(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))


def mean_abs_error(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean(np.abs(ref.astype(np.float64) - got.astype(np.float64))))


def cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Cosine similarity, per sample, then the minimum over the batch (the worst image decides)."""
    r = ref.reshape(ref.shape[0], -1).astype(np.float64)
    g = got.reshape(got.shape[0], -1).astype(np.float64)
    num = np.sum(r * g, axis=1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    c = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.all(r == g, axis=1), 1.0, 0.0))
    return float(np.min(c))


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB over the whole batch; inf when identical."""
    r = ref.astype(np.float64)
    noise = float(np.sum((r - got.astype(np.float64)) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def mean_sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """The mean over samples (axis 0) of each sample's SQNR in dB: a dim image counts as much as a bright one,
    where the pooled figure is dominated by the images with the most energy. inf when identical."""
    per = [sqnr_db(ref[i], got[i]) for i in range(ref.shape[0])]
    return float(np.mean(per)) if per else float("nan")


def top1_agreement(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    return float(np.mean(np.argmax(ref_logits, axis=1) == np.argmax(got_logits, axis=1)))


BOTTLENECK_METRICS = {
    "max_abs_error": max_abs_error,
    "mean_abs_error": mean_abs_error,
    "cosine": cosine,
    "sqnr_db": sqnr_db,
}
