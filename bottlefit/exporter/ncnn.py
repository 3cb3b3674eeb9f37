"""A PyTorch head as an ncnn model: ``NAME.param`` (layers as text) + ``NAME.bin`` (weights), fp32 or int8.

int8 follows ncnn's own scheme (the layout its ncnn2int8 tool writes, read by ``use_int8_inference``): each conv
keeps float32 weights with per-output-channel symmetric scales ``127 / max|w[c]|`` (ncnn quantizes them at load)
and one symmetric input scale ``127 / max|x|`` over the calibration images, accumulates in int32 and dequantizes its
output to float (``int8_scale_term`` 1) with its ReLU fused; max-pooling runs in float between convs. The
reference semantics of that scheme is :mod:`bottlefit.runtimes.ncnn`.

Known layers: a ``torch.nn.Sequential`` of Conv2d (square kernel, no groups or dilation), ReLU after a conv, and
MaxPool2d in floor mode: the BottleFit encoder heads after the max-pool BatchNorm fold
(bottlefit.exporter.head_rewrite.fold_pool_batchnorm). Anything else is a one-line UserError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bottlefit.errors import UserError

MAGIC = 7767517
INPUT, OUTPUT = "in0", "out0"


@dataclass(frozen=True)
class NcnnModel:
    param: Path
    weights: Path
    int8: bool
    input_scales: dict[str, float]  # conv layer name -> its symmetric input scale (int8 only)


def _plain(m: torch.nn.Module) -> bool:
    if isinstance(m, torch.nn.Conv2d):
        return m.groups == 1 and m.dilation == (1, 1) and len(set(m.kernel_size)) == 1 and \
            isinstance(m.padding, tuple)
    if isinstance(m, torch.nn.MaxPool2d):
        square = all(isinstance(v, int) or len(set(v)) == 1 for v in (m.kernel_size, m.stride, m.padding))
        return square and not m.ceil_mode and m.dilation in (1, (1, 1)) and not m.return_indices
    return isinstance(m, torch.nn.ReLU)


def write_ncnn(head: torch.nn.Module, images: np.ndarray, param: Path, *, int8: bool) -> NcnnModel:
    """Write ``param`` and its .bin for ``head`` (float32 NCHW ``images`` calibrate the int8 input scales and give
    the input size)."""
    layers = list(head.children()) if isinstance(head, torch.nn.Sequential) else [head]
    kinds = [type(m).__name__ for m in layers]
    bad = [f"{i}: {m}" for i, m in enumerate(layers) if not _plain(m)
           or (isinstance(m, torch.nn.ReLU) and (i == 0 or not isinstance(layers[i - 1], torch.nn.Conv2d)))]
    if bad or not layers:
        raise UserError(f"ncnn: the head's layers {kinds} are not all of plain Conv2d, ReLU after a conv, MaxPool2d "
                        f"(floor mode): {bad[0] if bad else 'empty'}")
    absmax: dict[int, float] = {}
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        for i, m in enumerate(layers):
            absmax[i] = float(x.abs().max())
            x = m(x)
    _, c, h, w = images.shape
    lines = [f"Input {INPUT} 0 1 {INPUT} 0={w} 1={h} 2={c}"]
    blob, weights, scales = INPUT, bytearray(), {}
    last = max(i for i, m in enumerate(layers) if not isinstance(m, torch.nn.ReLU))
    for i, m in enumerate(layers):
        if isinstance(m, torch.nn.ReLU):
            continue  # fused into the conv before it (activation_type 1)
        top = OUTPUT if i == last else f"b{i}"
        if isinstance(m, torch.nn.Conv2d):
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], torch.nn.ReLU)
            wt = m.weight.detach().numpy().astype(np.float32)
            bias = m.bias is not None
            lines.append(f"Convolution conv{i} 1 1 {blob} {top} 0={m.out_channels} 1={m.kernel_size[0]} "
                         f"3={m.stride[1]} 13={m.stride[0]} 4={m.padding[1]} 14={m.padding[0]} 5={int(bias)} "
                         f"6={wt.size}" + (" 9=1" if relu else "") + (" 8=1" if int8 else ""))
            weights += np.zeros(1, "<u4").tobytes() + wt.astype("<f4").tobytes()  # tag 0: float32 weights
            if bias:
                weights += m.bias.detach().numpy().astype("<f4").tobytes()
            if int8:
                wmax = np.abs(wt.reshape(wt.shape[0], -1)).max(1).astype(np.float64)
                w_scale = np.where(wmax > 0, 127.0 / np.maximum(wmax, 1e-30), 1.0)  # an all-zero channel: any
                s_in = 127.0 / absmax[i] if absmax[i] > 0 else 1.0
                weights += w_scale.astype("<f4").tobytes() + np.array([s_in], "<f4").tobytes()
                scales[f"conv{i}"] = float(np.float32(s_in))
        else:
            k, st, pd = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding))
            lines.append(f"Pooling pool{i} 1 1 {blob} {top} 0=0 1={k} 2={st} 3={pd} 5=1")  # 5=1: floor mode
        blob = top
    param = Path(param)
    bin_path = param.with_suffix(".bin")
    # magic, then the layer and blob counts (each layer makes one blob)
    param.write_text(f"{MAGIC}\n{len(lines)} {len(lines)}\n" + "\n".join(lines) + "\n")
    bin_path.write_bytes(bytes(weights))
    return NcnnModel(param, bin_path, int8, scales)
