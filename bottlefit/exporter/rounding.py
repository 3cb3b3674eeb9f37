"""Data-aware rounding of a head's conv weights to the int8 grid, and bias correction: corrected fp32 weights that
every converter (ONNX Runtime's Q/DQ writer, litert-torch, TensorRT) then quantizes to the same integers.

The grid is the one every converter uses for weights: symmetric int8, per output channel, scale = max|w| / 127.
The corrected weights are ``q * scale`` with integer ``q`` in [-127, 127] and every channel keeps one ``|q| = 127``,
so each converter recomputes the same scale and rounds back to the same ``q``.

- ``gptq``: Hessian-aware rounding (the OBQ/GPTQ member of the AdaRound family of "learned rounding"). For a conv
  reading patches ``x`` (im2col), the layer's output error over the calibration set is ``(w - q)ᵀ H (w - q)`` per
  output channel, with ``H = Σ x xᵀ``. Weights are rounded one input column at a time and each rounding error is
  spread over the columns not yet rounded through ``H⁻¹``'s Cholesky factor, so it is compensated where the inputs
  are correlated (neighbouring pixels and channels of a photo are). Closed form: deterministic, no learning rate,
  well under a second per layer. Layers are taken in order, each seeing the inputs the already-rounded layers
  before it produce.
- ``nearest``: round to nearest (what every converter does by itself).
- bias correction (either rounding): ``b += (w - q) · E[x]``, which removes the mean shift rounding puts on each
  output channel (exact in expectation over the calibration set, since the conv is linear in ``w``).

A conv followed by a BatchNorm is rounded as the converters will see it, with the BN folded in (``w · a`` per
output channel, ``a`` the BN's scale): the conv keeps ``q · scale / a``, so the converters' own fold lands back on
the grid (a float32 ulp away, never near a rounding tie), and a bias correction goes into the conv's bias
divided by ``a``. A channel whose BN scale is 0 keeps its weights. Grouped (depthwise) convs keep nearest rounding.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bottlefit.errors import UserError


class WeightRounding(StrEnum):
    """How the int8 heads' conv weights meet the int8 grid (``--weight-rounding``)."""

    NEAREST = "nearest"  # by each converter, from the float weights
    GPTQ = "gptq"  # Hessian-aware, on the calibration images, before any converter


METHODS = tuple(WeightRounding)
QMAX = 127
_DAMP = 0.01  # of H's mean diagonal: keeps the Cholesky stable where inputs are (nearly) collinear
_BATCH = 8


@dataclass
class Rounding:
    """What ``round_head`` did, per conv (module path inside the head): the layer's output SQNR on the calibration
    set with round-to-nearest and with the chosen method (dB), and the bias correction's size."""

    method: WeightRounding
    bias_correction: bool
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "bias_correction": self.bias_correction, "images": self.images,
                "layers": self.layers}


def check_method(method: str) -> None:
    """UserError naming the choices unless ``method`` is one of ``METHODS``."""
    if method not in METHODS:
        raise UserError(f"--weight-rounding {method!r}: choose one of {', '.join(METHODS)}")


def _patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """im2col of a conv's input: (N * L, C * kh * kw) in float64, the order of ``conv.weight.flatten(1)``."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        x = F.pad(x, conv._reversed_padding_repeated_twice,  # noqa: SLF001
            mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
        pad: Any = 0
    else:
        pad = conv.padding
    p = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=pad, stride=conv.stride)
    return p.transpose(1, 2).reshape(-1, p.shape[1]).double()


@torch.no_grad()
def _input_stats(head: nn.Module, conv: nn.Conv2d, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(H = Σ x xᵀ, Σ x, count) over the im2col patches ``conv`` reads when ``head`` runs on ``images``."""
    k = conv.weight[0].numel()
    h = torch.zeros(k, k, dtype=torch.float64)
    s = torch.zeros(k, dtype=torch.float64)
    n = 0
    seen: list[torch.Tensor] = []
    hook = conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        for i in range(0, len(images), _BATCH):
            seen.clear()
            head(torch.from_numpy(np.ascontiguousarray(images[i:i + _BATCH], dtype=np.float32)))
            for x in seen:
                p = _patches(x, conv)
                h += p.T @ p
                s += p.sum(0)
                n += p.shape[0]
    finally:
        hook.remove()
    return h, s, n


def _bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """An eval-mode BN's per-channel scale ``gamma / sqrt(var + eps)``, float64."""
    var = bn.running_var.detach().double() if bn.running_var is not None else torch.ones(bn.num_features)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var.double() + bn.eps)


def _grid(w: torch.Tensor) -> torch.Tensor:
    """Per-row scale of the converters' weight grid (max|w| / 127), float64; 1 for an all-zero row."""
    m = w.abs().amax(1)
    return torch.where(m > 0, m / QMAX, torch.ones_like(m))


def _gptq(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer q (float64) for rows of ``w`` (out, k), rounding column by column with error feedback via H."""
    w = w.clone()
    h = h.clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0  # an input that is always 0: its weight does not matter; nearest rounding
    h += _DAMP * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        qj = torch.clamp(torch.round(w[:, j] / scale), -QMAX, QMAX)
        q[:, j] = qj
        err = (w[:, j] - qj * scale) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
    return q


def _keep_scale(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Every row keeps one |q| = 127 (at its largest weight) so converters recompute the same scale."""
    q = q.clone()
    lost = (q.abs().amax(1) < QMAX) & (w.abs().amax(1) > 0)
    for r in torch.nonzero(lost).flatten().tolist():
        j = int(w[r].abs().argmax())
        q[r, j] = QMAX * (1.0 if float(w[r, j]) > 0 else -1.0)
    return q


def _sqnr(w: torch.Tensor, e: torch.Tensor, h: torch.Tensor) -> float:
    sig = float(torch.einsum("ok,kl,ol->", w, h, w))
    err = float(torch.einsum("ok,kl,ol->", e, h, e))
    return round(10 * math.log10(sig / err), 2) if err > 0 and sig > 0 else float("inf")


@torch.no_grad()
def round_head(head: nn.Module, images: np.ndarray, method: str = WeightRounding.GPTQ, *,
               bias_correction: bool = False) -> tuple[nn.Module, Rounding]:
    """A copy of ``head`` (an ``nn.Module`` whose ``encoder`` is an ``nn.Sequential``) with its conv weights on
    the int8 grid by ``method`` and, with ``bias_correction``, each conv's bias corrected for the rounding's mean
    error; calibrated on ``images`` (float32 NCHW, preprocessed). Attributes the head carries (an equalization
    record) stay. The original is not touched."""
    check_method(method)
    if len(images) == 0:
        raise UserError("weight rounding needs calibration images: pass --calib PATH")
    out = copy.deepcopy(head).eval()
    if not isinstance(getattr(out, "encoder", None), nn.Sequential):
        raise UserError(f"weight rounding expects the head's encoder as nn.Sequential, got "
                        f"{type(getattr(out, 'encoder', None)).__name__}")
    for mod in out.modules():
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    record = Rounding(WeightRounding(method), bias_correction, images=int(len(images)))
    children = list(out.encoder.named_children())
    for k, (name, conv) in enumerate(children):
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            continue
        bn = children[k + 1][1] if k + 1 < len(children) and isinstance(children[k + 1][1], nn.BatchNorm2d) else None
        a = _bn_scale(bn) if bn is not None else None  # type: ignore[arg-type]
        h, s, n = _input_stats(out, conv, images)
        w = conv.weight.detach().double().flatten(1)
        if a is not None:
            w = w * a[:, None]  # what the converters quantize once they fold the BN
        scale = _grid(w)
        nearest = torch.clamp(torch.round(w / scale[:, None]), -QMAX, QMAX)
        q = _keep_scale(_gptq(w, h, scale) if method == WeightRounding.GPTQ else nearest, w)
        wq = (q.float() * scale.float()[:, None]).double()  # what converters will dequantize, bit for bit
        row: dict[str, Any] = {"sqnr_db_nearest": _sqnr(w, w - nearest * scale[:, None], h),
                               "sqnr_db": _sqnr(w, w - wq, h)}
        if bias_correction:
            shift = (w - wq) @ (s / max(n, 1))  # E[w·x] - E[q·x] per output channel, after the BN's scale
            if a is not None:  # the BN scales what the conv adds: a · (conv + shift / a) = a · conv + shift
                shift = torch.where(a != 0, shift / torch.where(a != 0, a, 1.0), torch.zeros_like(shift))
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels), requires_grad=False)
            conv.bias.copy_((conv.bias.double() + shift).float())
            row["bias_shift_max"] = float(shift.abs().max())
        if a is not None:
            live = (a != 0)[:, None]
            wq = torch.where(live, wq / torch.where(live, a[:, None], 1.0), conv.weight.detach().double().flatten(1))
            row["folded_batchnorm"] = f"encoder.{children[k + 1][0]}"
        conv.weight.copy_(wq.float().view_as(conv.weight))
        record.layers[f"encoder.{name}"] = row
    if not record.layers:
        raise UserError("weight rounding: the head has no Conv2d to round")
    for p in out.parameters():
        p.requires_grad_(False)
    return out, record
