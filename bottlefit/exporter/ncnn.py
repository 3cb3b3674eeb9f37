"""A PyTorch head as an ncnn model: ``NAME.param`` (layers as text) + ``NAME.bin`` (weights), fp32 or int8.

int8 follows ncnn's own scheme (the layout its ncnn2int8 tool writes, read by ``use_int8_inference``): each conv
keeps float32 weights with per-output-channel symmetric scales ``127 / max|w[c]|`` (ncnn quantizes them at load)
and one symmetric input scale ``127 / amax`` (amax: the export's observer over the calibration images; minmax is
ncnn2int8's ``max|x|``, mse or search gained 0.5 dB on R152 v2), accumulates in int32 and dequantizes its
output to float (``int8_scale_term`` 1) with its ReLU fused; max-pooling and a stand-alone BatchNorm (an ncnn Scale
layer) run in float between convs. The reference semantics of that scheme is :mod:`bottlefit.runtimes.ncnn`.

Known layers: a ``torch.nn.Sequential`` of Conv2d (square kernel, no groups or dilation) with an optional
BatchNorm2d folded into it, ReLU, MaxPool2d in floor mode and stand-alone BatchNorm2d: BottleFit's encoder heads.
Anything else is a one-line UserError, before any file is written.

The Input layer's name carries the first 16 hex digits of the .bin's sha256 (ncnn ignores layer names), so the
.param's own digest, which binds a head's payloads to its export, covers the weights too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bottlefit.errors import UserError
from bottlefit.exporter.head_rewrite import bn_affine, fold_conv_bn

MAGIC = 7767517
INPUT, OUTPUT = "in0", "out0"


@dataclass(frozen=True)
class NcnnModel:
    param: Path
    weights: Path
    int8: bool
    input_scales: dict[str, float]  # conv layer name -> its symmetric input scale (int8 only)
    layers: list[str]  # the ncnn layer types, in order


def _plain(m: torch.nn.Module) -> bool:
    if isinstance(m, torch.nn.Conv2d):
        return m.groups == 1 and m.dilation == (1, 1) and len(set(m.kernel_size)) == 1 and \
            isinstance(m.padding, tuple) and m.padding_mode == "zeros"
    if isinstance(m, torch.nn.MaxPool2d):
        square = all(isinstance(v, int) or len(set(v)) == 1 for v in (m.kernel_size, m.stride, m.padding))
        return square and not m.ceil_mode and m.dilation in (1, (1, 1)) and not m.return_indices
    if isinstance(m, torch.nn.BatchNorm2d):
        return m.running_mean is not None and m.running_var is not None
    return isinstance(m, torch.nn.ReLU)


def _layers(head: torch.nn.Module) -> list[torch.nn.Module]:
    """The head's layers with each Conv2d -> BatchNorm2d pair folded into one conv."""
    items = list(head.children()) if isinstance(head, torch.nn.Sequential) else [head]
    bad = [f"{i}: {m}" for i, m in enumerate(items) if not _plain(m)]
    if bad or not items:
        raise UserError(f"ncnn: the head's layers {[type(m).__name__ for m in items]} are not all plain Conv2d, "
                        f"BatchNorm2d, ReLU, MaxPool2d (floor mode): {bad[0] if bad else 'empty'}")
    out: list[torch.nn.Module] = []
    for m in items:
        if isinstance(m, torch.nn.BatchNorm2d) and out and isinstance(out[-1], torch.nn.Conv2d):
            out[-1] = fold_conv_bn(out[-1], m)
        else:
            out.append(m)
    return out


def _input_amax(layers: list[torch.nn.Module], images: np.ndarray, observer: str) -> dict[int, float]:
    """Layer index -> the symmetric clipping threshold of each conv's input over ``images`` (``observer``)."""
    from bottlefit.calibration.observers import calibrate_two_pass

    def run_pass(feed: Callable[[str, torch.Tensor], None]) -> None:
        with torch.no_grad():
            for s in range(0, len(images), 8):
                x = torch.from_numpy(np.ascontiguousarray(images[s:s + 8], dtype=np.float32))
                for i, m in enumerate(layers):
                    if isinstance(m, torch.nn.Conv2d):
                        feed(str(i), x)
                    x = m(x)

    return {int(k): float(obs.amax()) for k, obs in calibrate_two_pass(observer, run_pass).items()}


def write_ncnn(head: torch.nn.Module, images: np.ndarray, param: Path, *, int8: bool,
               observer: str = "minmax") -> NcnnModel:
    """Write ``param`` and its .bin for ``head`` (float32 NCHW ``images`` give the input size and, with
    ``observer``, each int8 conv's symmetric input threshold: minmax is ncnn2int8's absmax)."""
    layers = _layers(head)
    absmax = _input_amax(layers, images, observer) if int8 else {}
    _, c, h, w = images.shape
    lines: list[str] = []
    blob, weights, scales, kinds = INPUT, bytearray(), {}, ["Input"]
    fused = {i for i, m in enumerate(layers) if isinstance(m, torch.nn.ReLU) and i
             and isinstance(layers[i - 1], torch.nn.Conv2d)}
    last = max(i for i in range(len(layers)) if i not in fused)
    for i, m in enumerate(layers):
        if i in fused:
            continue  # the conv before it applies it (activation_type 1)
        top = OUTPUT if i == last else f"b{i}"
        if isinstance(m, torch.nn.Conv2d):
            wt = m.weight.detach().numpy().astype(np.float32)
            bias = m.bias is not None
            lines.append(f"Convolution conv{i} 1 1 {blob} {top} 0={m.out_channels} 1={m.kernel_size[0]} "
                         f"3={m.stride[1]} 13={m.stride[0]} 4={m.padding[1]} 14={m.padding[0]} 5={int(bias)} "
                         f"6={wt.size}" + (" 9=1" if i + 1 in fused else "") + (" 8=1" if int8 else ""))
            weights += np.zeros(1, "<u4").tobytes() + wt.astype("<f4").tobytes()  # tag 0: float32 weights
            if bias:
                weights += m.bias.detach().numpy().astype("<f4").tobytes()
            if int8:
                wmax = np.abs(wt.reshape(wt.shape[0], -1)).max(1).astype(np.float64)
                w_scale = np.where(wmax > 0, 127.0 / np.maximum(wmax, 1e-30), 1.0)  # an all-zero channel: any
                s_in = 127.0 / absmax[i] if absmax.get(i, 0) > 0 else 1.0
                weights += w_scale.astype("<f4").tobytes() + np.array([s_in], "<f4").tobytes()
                scales[f"conv{i}"] = float(np.float32(s_in))
        elif isinstance(m, torch.nn.MaxPool2d):
            k, st, pd = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding))
            lines.append(f"Pooling pool{i} 1 1 {blob} {top} 0=0 1={k} 2={st} 3={pd} 5=1")  # 5=1: floor mode
        elif isinstance(m, torch.nn.BatchNorm2d):  # y = a x + b per channel
            a, b = bn_affine(m)
            lines.append(f"Scale bn{i} 1 1 {blob} {top} 0={a.numel()} 1=1")
            weights += a.numpy().astype("<f4").tobytes() + b.numpy().astype("<f4").tobytes()
        else:
            lines.append(f"ReLU relu{i} 1 1 {blob} {top}")
        kinds.append(lines[-1].split()[0])
        blob = top
    digest = hashlib.sha256(bytes(weights)).hexdigest()[:16]
    lines.insert(0, f"Input weights_{digest} 0 1 {INPUT} 0={w} 1={h} 2={c}")
    param = Path(param)
    bin_path = param.with_suffix(".bin")
    # magic, then the layer and blob counts (each layer makes one blob)
    param.write_text(f"{MAGIC}\n{len(lines)} {len(lines)}\n" + "\n".join(lines) + "\n")
    bin_path.write_bytes(bytes(weights))
    return NcnnModel(param, bin_path, int8, scales, kinds)
