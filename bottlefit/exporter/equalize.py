"""Bottleneck channel equalization across the split.

The bottleneck crosses the wire as ONE per-tensor int8 grid, but its channels differ in spread (measured on an
untrained R152 v2: channel std 0.18-0.58, heavy tails): the narrow channels get a few levels of the grid and
the wire's quantization dominates the head's error. Scaling every bottleneck channel ``c`` by ``s_c > 0`` at the
encoder's last per-channel layer and by ``1 / s_c`` at the decoder's first one leaves ``tail(head(x))`` exactly
the model (up to float rounding), and lets one per-tensor grid serve every channel as a per-channel one would.

``s_c = A / a_c`` with ``a_c`` the channel's MSE-optimal int8 clipping threshold on the calibration images
(per-channel ``MseObserver``) and ``A`` their largest, so no channel shrinks. The scales fold in:
- encoder side, walking back over layers that commute with a positive per-channel scale (ReLU, max/avg
  pooling, identity): a Conv2d's output channels (weight and bias) or a BatchNorm2d's affine;
- decoder side, walking forward over the same: a BatchNorm2d (``gamma / s``, ``running_mean * s``), a Conv2d's
  input channels (ungrouped) or a ConvTranspose2d's.

The equalized head, tail and model are copies; the caller's model is untouched, so ``check_split`` of the
result against the original model proves the fold.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from bottlefit.calibration.observers import MseObserver
from bottlefit.errors import UserError
from bottlefit.exporter.split import SplitModel, split

# Layers a positive per-channel scale passes through unchanged: f(s * x) = s * f(x).
_COMMUTES = (nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity, nn.Dropout)


@dataclass
class Equalization:
    """What the manifest records: the per-channel scales and where they were folded."""

    scales: list[float]
    encoder_layer: str  # model path of the layer scaled by s
    decoder_layer: str  # model path of the layer scaled by 1 / s
    thresholds: list[float] = field(default_factory=list)  # per-channel a_c before equalization
    offsets: list[float] = field(default_factory=list)  # per-channel centre o_c (all 0 when not centred)
    method: str = "mse"
    calibration_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "scales": list(self.scales), "encoder_layer": self.encoder_layer,
                "decoder_layer": self.decoder_layer, "channel_thresholds": list(self.thresholds),
                "offsets": list(self.offsets),
                "calibration_count": self.calibration_count,
                "note": "the head emits (z - offset) * scale per channel; the tail's first layer undoes it"}


def _last_scalable(seq: nn.Module, prefix: str) -> tuple[nn.Module, str, bool]:
    """The encoder's last per-channel affine layer, and whether it is the very last layer (an offset folds in
    only then: ReLU and pooling commute with a positive scale, not with a shift)."""
    mods = list(seq.named_children()) if isinstance(seq, nn.Sequential) else [("", seq)]
    for k, (name, m) in enumerate(reversed(mods)):
        if isinstance(m, nn.Conv2d | nn.BatchNorm2d):
            return m, f"{prefix}.{name}" if name else prefix, k == 0
        if not isinstance(m, _COMMUTES):
            break
    raise UserError(f"{prefix}: the encoder does not end in a Conv2d/BatchNorm2d (through ReLU/pooling); "
                    "bottleneck equalization cannot fold its scales there; export without --equalize")


def _first_scalable(seq: nn.Module, prefix: str) -> tuple[nn.Module, str, bool]:
    """The decoder's first layer that can take 1 / s, and whether it can also take the offset back (only a
    BatchNorm2d first in line can: a padded convolution would see the shift at its borders)."""
    mods = list(seq.named_children()) if isinstance(seq, nn.Sequential) else [("", seq)]
    for k, (name, m) in enumerate(mods):
        if isinstance(m, nn.BatchNorm2d | nn.ConvTranspose2d) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            return m, f"{prefix}.{name}" if name else prefix, k == 0 and isinstance(m, nn.BatchNorm2d)
        if not isinstance(m, _COMMUTES):
            break
    raise UserError(f"{prefix}: the decoder does not begin with a BatchNorm2d or an ungrouped convolution; "
                    "bottleneck equalization cannot fold its inverse scales there; export without --equalize")


@torch.no_grad()
def _scale_out(m: nn.Module, s: torch.Tensor, o: torch.Tensor) -> None:
    """y -> (y - o) * s per output channel."""
    if isinstance(m, nn.Conv2d):
        m.weight.mul_(s.view(-1, 1, 1, 1))
        if m.bias is None and bool(o.any()):
            m.bias = nn.Parameter(torch.zeros(m.out_channels, dtype=m.weight.dtype))
        if m.bias is not None:
            m.bias.sub_(o).mul_(s)
    else:
        assert isinstance(m, nn.BatchNorm2d)
        if m.weight is None or m.bias is None:
            raise UserError("bottleneck equalization needs an affine BatchNorm2d at the end of the encoder")
        m.weight.mul_(s)
        m.bias.sub_(o).mul_(s)


@torch.no_grad()
def _scale_in(m: nn.Module, s: torch.Tensor, o: torch.Tensor) -> None:
    """x -> x / s + o per input channel (o is 0 unless ``m`` is a BatchNorm2d)."""
    if isinstance(m, nn.BatchNorm2d):
        # gamma * (x / s + o - mean) / sqrt(var + eps) = (gamma / s) * (x - s * (mean - o)) / sqrt(var + eps)
        if m.weight is None or m.running_mean is None:
            raise UserError("bottleneck equalization needs an affine BatchNorm2d with running statistics")
        m.weight.div_(s)
        m.running_mean.sub_(o).mul_(s)
    elif isinstance(m, nn.ConvTranspose2d):
        m.weight.div_(s.view(-1, 1, 1, 1))  # (in, out/groups, kh, kw)
    else:
        m.weight.div_(s.view(1, -1, 1, 1))  # (out, in, kh, kw)


def _decoder_path(encoder_path: str) -> str:
    parent, _, name = encoder_path.rpartition(".")
    if name != "encoder":
        raise UserError(f"{encoder_path}: bottleneck equalization expects the bottleneck's encoder/decoder pair")
    return f"{parent}.decoder" if parent else "decoder"


_TAIL = 0.001  # the quantile each end of a channel's range is read at, for its midpoint


def _threshold(ch: np.ndarray) -> tuple[float, float]:
    """(MSE-optimal symmetric int8 threshold of ``ch`` about 0, the squared error of that grid on ``ch``)."""
    x = ch.astype(np.float32)
    obs = MseObserver()
    obs.prime(float(x.min()), float(x.max()))
    obs.update(x)
    a = float(obs.amax())
    if a <= 0:
        return a, 0.0
    step = 2 * a / 255
    q = np.clip(np.round(ch / step), -127.5, 127.5) * step
    return a, float(np.mean((q - ch) ** 2))


def _wire_sqnr(z: np.ndarray, o: np.ndarray, a: np.ndarray) -> float:
    """Mean per-image SQNR (dB) of ``z`` (N, C, ...) through the equalized wire: each channel centred on ``o`` and
    scaled to the largest threshold, one symmetric int8 grid, and back."""
    live = a > 0
    ref = float(a[live].max()) if live.any() else 1.0
    s = np.where(live, ref / np.where(live, a, 1.0), 1.0)
    shape = (1, -1) + (1,) * (z.ndim - 2)
    step = 2 * ref / 255
    y = (z - o.reshape(shape)) * s.reshape(shape)
    back = np.clip(np.round(y / step), -127.5, 127.5) * step / s.reshape(shape) + o.reshape(shape)
    sig = (z.reshape(len(z), -1) ** 2).sum(1)
    err = ((back - z).reshape(len(z), -1) ** 2).sum(1)
    return float(np.mean(10 * np.log10(np.maximum(sig, 1e-30) / np.maximum(err, 1e-30))))


@torch.no_grad()
def channel_thresholds(head: nn.Module, images: np.ndarray, centre: bool = True,
                       batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per bottleneck channel over ``images``: (centre, MSE-optimal symmetric int8 threshold about it).

    The centres (0 when not ``centre``) are the channels' means, the midpoints of their 0.1%-99.9% quantile ranges,
    or per channel whichever of the two quantizes it with the smaller error, and of these three the one whose
    equalized wire keeps the best mean per-image SQNR on ``images`` wins. The midpoint lets a skewed channel fill
    both halves of the grid (trained demo model: the wire's own error 40.2 dB about the means, 42.5 dB about the
    midpoints); quantiles, not min/max, keep one extreme calibration value from moving it (untrained R152 v2,
    asymmetric head with search and GPTQ, held-out photos: 33.6 dB about the means, 32.1 about min/max
    midpoints, 34.3 about quantile midpoints). Each histogram spans exactly its centred channel's |max|."""
    outs = [head(torch.from_numpy(np.ascontiguousarray(images[i : i + batch]))).numpy()
            for i in range(0, len(images), batch)]
    z = np.concatenate(outs).astype(np.float64)
    per_channel: list[list[tuple[float, float, float]]] = []  # per channel: (centre, threshold, error) per option
    for c in range(z.shape[1]):
        ch = z[:, c].ravel()
        lo, hi = np.quantile(ch, [_TAIL, 1 - _TAIL])  # robust ends: a lone extreme does not move the centre
        options = [float(ch.mean()), float((lo + hi) / 2)] if centre else [0.0]
        per_channel.append([(o, *_threshold(ch - o)) for o in options])
    choices = [[opts[k] for opts in per_channel] for k in range(len(per_channel[0]))]
    if centre:
        choices.append([min(opts, key=lambda t: t[2]) for opts in per_channel])
    best = max(choices, key=lambda ch: _wire_sqnr(z, np.array([t[0] for t in ch]), np.array([t[1] for t in ch])))
    return (np.asarray([t[0] for t in best], dtype=np.float64), np.asarray([t[1] for t in best], dtype=np.float64))


def equalize_split(sm: SplitModel, images: np.ndarray, centre: bool = True) -> tuple[SplitModel, Equalization]:
    """The equalized split. ``centre``: also shift each channel to its centre where the layers allow it, so one
    grid fits skewed channels too, symmetric or not. Head, tail and model are new objects (the bottleneck
    copied, every other parameter shared); ``sm.model`` stays the result's reference model, so ``check_split``
    compares the equalized tail(head(x)) with the original model. The head carries the record as
    ``head.equalization``."""
    if images.ndim != 4 or len(images) == 0:
        raise UserError("bottleneck equalization needs calibration images (float32 NCHW)")
    _, _, enc_last, _, _, dec_first = _fold_points(sm)
    centred = centre and enc_last and dec_first
    o64, a = channel_thresholds(sm.head, images, centre=centred)
    if not np.all(np.isfinite(a)):
        raise UserError("bottleneck equalization: non-finite bottleneck values on the calibration images")
    ref = float(a.max())
    # A dead channel (all zeros) keeps scale 1: nothing to spread over the grid.
    s64 = np.where(a > 0, ref / np.where(a > 0, a, 1.0), 1.0)
    rec = Equalization([float(v) for v in s64.astype(np.float32)], "", "", [float(v) for v in a],
                       [float(v) for v in o64.astype(np.float32)], method="mse-centred" if centred else "mse",
                       calibration_count=int(len(images)))
    eq = apply_equalization(sm, rec.to_dict())
    rec.encoder_layer, rec.decoder_layer = eq.head.equalization["encoder_layer"], eq.head.equalization["decoder_layer"]
    return eq, rec


def _fold_points(model_or_split: Any) -> tuple[nn.Module, str, bool, nn.Module, str, bool]:
    sm = model_or_split
    enc_path = sm.card.bottleneck.module
    dec_path = _decoder_path(enc_path)
    enc = _last_scalable(sm.model.get_submodule(enc_path), enc_path)
    dec = _first_scalable(sm.model.get_submodule(dec_path), dec_path)
    return (*enc, *dec)


def apply_equalization(sm: SplitModel, record: dict[str, Any]) -> SplitModel:
    """``sm`` equalized with a recorded equalization (``Equalization.to_dict()``, as the manifest keeps it): what
    ``bottlefit verify`` re-applies to the re-loaded checkpoint. Deterministic: no data involved."""
    enc_path = sm.card.bottleneck.module
    parent_path = enc_path.rpartition(".")[0]
    if not parent_path:
        raise UserError(f"{enc_path}: bottleneck equalization expects the encoder inside a bottleneck module")
    model = copy.copy(sm.model)
    _set_submodule(model, parent_path, copy.deepcopy(sm.model.get_submodule(parent_path)))
    shadow = SplitModel(sm.head, sm.tail, sm.card, model)
    enc_layer, enc_name, enc_last, dec_layer, dec_name, dec_first = _fold_points(shadow)
    s = torch.tensor(record["scales"], dtype=torch.float32)
    o = torch.tensor(record.get("offsets") or [0.0] * len(s), dtype=torch.float32)
    if bool(o.any()) and not (enc_last and dec_first):
        raise UserError("the recorded equalization shifts channels, but this model's layers cannot take a shift; "
                        "re-export it")
    _scale_out(enc_layer, s, o)
    _scale_in(dec_layer, s, o)
    eq = split(model, sm.card)
    eq.head.equalization = {**record, "encoder_layer": enc_name,  # type: ignore[assignment]
                            "decoder_layer": dec_name}
    return replace(eq, model=sm.model)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the module at ``path`` in ``root`` by ``new``, copying (shallowly) the modules on the way, so the
    original model keeps its own."""
    parts = path.split(".")
    node = root
    node._modules = dict(node._modules)  # noqa: SLF001 — copy the child table, not the children
    for name in parts[:-1]:
        child = copy.copy(node._modules[name])
        child._modules = dict(child._modules)
        node._modules[name] = child
        node = child
    node._modules[parts[-1]] = new


def unequalize(z: np.ndarray, record: dict[str, Any] | None) -> np.ndarray:
    """The original bottleneck from an equalized one (NCHW): what a fidelity figure compares across recipes."""
    if not record:
        return z
    s = np.asarray(record["scales"], dtype=np.float64).reshape(1, -1, 1, 1)
    o = np.asarray(record.get("offsets") or [0.0] * s.size, dtype=np.float64).reshape(1, -1, 1, 1)
    return (z / s + o).astype(np.float32)
