"""Per-tensor range search: for each activation, the range that minimises the error of the layer reading it.

One histogram per tensor (``SearchObserver``) yields the candidate ranges of every calibration method the
observers know: min/max, percentiles, TensorRT's entropy (KL) threshold and the MSE-optimal threshold. The
candidates are then judged, tensor by tensor, the way TensorRT's and ModelOpt's calibrators judge them but on
the layer's output instead of the tensor itself: the tensor, fake-quantized with a candidate, goes through
the convolution that reads it (``LayerProbe``), and the candidate with the smallest output error wins. A
tensor no convolution reads (the bottleneck itself, a max-pool's input) is judged on its own error.

The winner is frozen in a ``FixedObserver``, which the Q/DQ writer and the TFLite converter take like any
other observer: one recipe, whatever the converter. The choice is recorded per tensor (``SearchChoice``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bottlefit.calibration.observers import FixedObserver, Observer, SearchObserver, fake_quant


@dataclass(frozen=True)
class LayerProbe:
    """The convolution that reads a tensor, to judge a range by that layer's output (bias cancels out)."""

    weight: np.ndarray  # OIHW (Conv) float32
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right (ONNX order: begins then ends)
    dilations: tuple[int, int]
    group: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t, left, b, r = self.pads
        x = F.pad(x, (left, r, t, b)) if any(self.pads) else x
        return F.conv2d(x, torch.from_numpy(self.weight), None, self.strides, 0, self.dilations, self.group)


@dataclass(frozen=True)
class SearchChoice:
    """What the search chose for one tensor, with every candidate's relative output error (dB below signal)."""

    method: str
    lo: float
    hi: float
    judged_by: str  # "layer" (the conv reading it) | "tensor" (its own error)
    errors_db: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "lo": self.lo, "hi": self.hi, "judged_by": self.judged_by,
                "sqnr_db": {k: round(v, 3) for k, v in self.errors_db.items()}}


def _sum_squares(t: torch.Tensor) -> float:
    # squared in place in a float64 copy: one temporary instead of two, the same values as ``(t.double() ** 2)``
    return float(t.to(torch.float64, copy=True).pow_(2).sum())


def _sqnr(ref: torch.Tensor, err: torch.Tensor) -> float:
    s, n = _sum_squares(ref), _sum_squares(err)
    if n == 0.0:
        return math.inf
    return 10.0 * math.log10(s / n) if s > 0 else -math.inf


def _worst_sqnr(ref: torch.Tensor, err: torch.Tensor) -> float:
    return min(_sqnr(ref[i], err[i]) for i in range(ref.shape[0]))


def choose(
    observer: SearchObserver,
    samples: np.ndarray | None,
    symmetric: bool,
    dtype: str = "int8",
    probe: LayerProbe | None = None,
    worst_image: bool = False,
) -> tuple[FixedObserver, SearchChoice]:
    """The candidate range with the best output SQNR on ``samples`` (a few calibration images' values of the
    tensor); without samples, the histogram's own-error pick. Ties go to the earlier (simpler) method.
    ``worst_image``: the SQNR of the worst sample image decides, not the pooled one: for the head's output,
    which parity judges per image (clipping that helps on average can ruin an image with large values)."""
    cands = observer.candidates(symmetric)
    if samples is None or observer.R == 0.0:
        lo, hi = observer._pick(symmetric)  # noqa: SLF001
        method = next(k for k, v in cands.items() if v == (lo, hi))
        return _fixed(lo, hi, method), SearchChoice(method, lo, hi, "histogram", {})
    x = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    with torch.no_grad():
        ref = probe(x) if probe is not None else x
        scores: dict[str, float] = {}
        for name, (lo, hi) in cands.items():
            q = fake_quant(x, lo, hi, symmetric, dtype)
            out = probe(q) if probe is not None else q
            del q  # without a probe ``out`` is ``q``: the in-place error below reuses it
            scores[name] = (_worst_sqnr if worst_image else _sqnr)(ref, out.sub_(ref))
            del out
    method = max(scores, key=lambda k: (scores[k], -list(cands).index(k)))
    lo, hi = cands[method]
    judged = "layer" if probe is not None else "tensor (worst image)" if worst_image else "tensor"
    return _fixed(lo, hi, method), SearchChoice(method, lo, hi, judged, scores)


def _fixed(lo: float, hi: float, method: str) -> FixedObserver:
    return FixedObserver(lo, hi, max(abs(lo), abs(hi)), method)


def search(
    observers: dict[str, Observer],
    samples: dict[str, np.ndarray],
    symmetric: bool,
    dtype: str = "int8",
    probes: dict[str, LayerProbe] | None = None,
    per_image: set[str] | frozenset[str] = frozenset(),
    consume: bool = False,
) -> tuple[dict[str, Observer], dict[str, SearchChoice]]:
    """A ``FixedObserver`` per searched tensor (``SearchObserver``s), judged on ``samples`` through ``probes``
    (the tensors in ``per_image`` by their worst image); other observers pass through unchanged. Same order as
    ``observers``. ``consume``: each tensor's samples leave ``samples`` once judged, so the activations of the
    tensors already decided are freed while the rest are judged."""
    out: dict[str, Observer] = {}
    choices: dict[str, SearchChoice] = {}
    for name, obs in observers.items():
        if not isinstance(obs, SearchObserver):
            out[name] = obs
            continue
        x = samples.pop(name, None) if consume else samples.get(name)
        out[name], choices[name] = choose(obs, x, symmetric, dtype, (probes or {}).get(name),
                                          worst_image=name in per_image)
        del x
    return out, choices


__all__ = ["LayerProbe", "SearchChoice", "choose", "search"]
