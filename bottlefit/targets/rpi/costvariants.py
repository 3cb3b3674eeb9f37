"""Head variants the Pi cost bench (bench/bench_pi_cost.py) counts beside the bundle's heads: the export's head in
PyTorch, its space-to-depth rewrites, the stem conv's GEMM alone (the floor of what the int8 head can cost) and an
fp32 ncnn model. Here, not in the script, so the tests that prove what each variant is can import them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

S2D = {"head.fp32.tflite": "head.s2d.fp32.tflite", "head.int8.tflite": "head.s2d.int8.tflite",
       "head.int8.onnx": "head.s2d.int8.onnx"}
NCNN_FP32 = "head.fp32.ncnn.param"
FLOOR = ("stem.gemm.int8.onnx", "stem.gemm.fp32.onnx", "stem.conv.int8.onnx", "stem.conv1x1.int8.onnx")


def torch_head(params: dict[str, Any]) -> tuple[Any, str, np.ndarray]:
    """(the untrained PyTorch head, eval mode; its module path; 16 built-in calibration images, float32 NCHW)."""
    from bottlefit.calibration.dataset import CalibrationSet
    from bottlefit.models.checkpoint import untrained

    params = dict(params)
    loaded = untrained(params.pop("arch"), params)
    head = loaded.model.get_submodule(loaded.card.bottleneck.module).eval()
    images = np.array(CalibrationSet.builtin(loaded.card, count=16, log=lambda s: None).images, dtype=np.float32)
    return head, loaded.card.bottleneck.module, images


def exported_head(head: Any, prefix: str) -> Any:
    """``head`` as the export ships it: the BatchNorm after the max-pool folded into the stem conv where exact."""
    from bottlefit.exporter.head_rewrite import fold_pool_batchnorm

    folded = fold_pool_batchnorm(head, prefix)
    return folded[0] if folded else head


def export_s2d(head: Any, images: np.ndarray, prefix: str, folder: Path) -> None:
    """The space-to-depth variants of the three heads, made the rpi target's way."""
    import torch

    from bottlefit.exporter.head_rewrite import rewrite_head
    from bottlefit.targets.rpi import write_int8_onnx
    from bottlefit.targets.rpi.tflite import export_tflite

    head = exported_head(head, prefix)
    rw = rewrite_head(head, prefix, torch.from_numpy(images[:2]), space_to_depth=True)
    if not any("space-to-depth" in c for c in rw.changes):
        raise SystemExit("--variants s2d: the head's first conv is not a stride-2 conv over few channels")
    print(f"s2d rewrite: max abs error {rw.max_abs_error:.2e}; " + "; ".join(rw.changes), file=sys.stderr)
    for int8 in (True, False):
        info = export_tflite(rw, images, folder / S2D[f"head.{'int8' if int8 else 'fp32'}.tflite"], int8=int8,
                             log=lambda s: None)
        if int8 and info.float_ops:
            raise SystemExit(f"s2d int8 TFLite head keeps float ops: {[f.describe() for f in info.float_ops]}")
    write_int8_onnx(rw.module, images, folder / S2D["head.int8.onnx"])


def export_floor(head: Any, images: np.ndarray, prefix: str, folder: Path) -> tuple[int, int, int]:
    """The stem conv's GEMM alone (``FLOOR``: int8 and fp32) of the export's (folded) head; returns (M, K, N)."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    head = exported_head(head, prefix)
    conv = next(m for m in head.modules() if isinstance(m, torch.nn.Conv2d))
    seen: list[tuple[int, ...]] = []
    hook = conv.register_forward_hook(lambda _m, _i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        head(torch.from_numpy(images[:1]))
    hook.remove()
    m, k, n = seen[0][2] * seen[0][3], conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1], conv.out_channels
    rng = np.random.default_rng(0)
    for name, int8 in zip(FLOOR[:2], (True, False), strict=True):
        if int8:
            b = numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "B")
            zp = numpy_helper.from_array(np.array(128, np.uint8), "a_zero_point")
            node = helper.make_node("MatMulInteger", ["A", "B", "a_zero_point"], ["Y"])
            io = (TensorProto.UINT8, TensorProto.INT32)
            inits = [b, zp]
        else:
            inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "B")]
            node = helper.make_node("MatMul", ["A", "B"], ["Y"])
            io = (TensorProto.FLOAT, TensorProto.FLOAT)
        g = helper.make_graph([node], "stem_gemm", [helper.make_tensor_value_info("A", io[0], [m, k])],
                              [helper.make_tensor_value_info("Y", io[1], [m, n])], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.save(model, str(folder / name))
    size, out = images.shape[2], seen[0][2]
    _stem_conv((conv.kernel_size, conv.stride, conv.padding, conv.in_channels), conv.out_channels, size, out,
               folder / FLOOR[2], rng)
    # the same GEMM and requantization without im2col: a 1x1 QLinearConv over the patches, gathered beforehand
    _stem_conv(((1, 1), (1, 1), (0, 0), k), conv.out_channels, out, out, folder / FLOOR[3], rng)
    print(f"stem GEMM floor: M={m} K={k} N={n} ({m * k * n / 1e6:.1f} M MACs)", file=sys.stderr)
    return m, k, n


def export_ncnn(head: Any, images: np.ndarray, prefix: str, folder: Path) -> None:
    """The exported head (BatchNorm folded) as an fp32 ncnn model, NCNN_FP32 (the bundle ships the int8 one)."""
    from bottlefit.exporter.ncnn import write_ncnn

    write_ncnn(exported_head(head, prefix), images, folder / NCNN_FP32, int8=False)


def _stem_conv(geometry: tuple[Any, Any, Any, int], cout: int, size: int, out_size: int, path: Path,
               rng: np.random.Generator) -> None:
    """A conv as the optimized int8 head runs it: ONNX Runtime's NHWC uint8 QLinearConv (com.microsoft,
    channels_last; im2col, U8S8 GEMM, per-channel requantization), uint8 NHWC in and out. ``geometry``: (kernel,
    stride, padding, input channels)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    (kh, kw), stride, padding, cin = geometry
    t = {"x_scale": np.array(0.02, np.float32), "x_zero_point": np.array(128, np.uint8),
         "w": rng.integers(-127, 128, (cout, cin, kh, kw)).astype(np.int8),
         "w_scale": (rng.random(cout) * 0.01 + 1e-3).astype(np.float32), "w_zero_point": np.zeros(cout, np.int8),
         "y_scale": np.array(0.05, np.float32), "y_zero_point": np.array(0, np.uint8),
         "bias": rng.integers(-1000, 1000, cout).astype(np.int32)}
    node = helper.make_node("QLinearConv", ["x", *t], ["y"], domain="com.microsoft", kernel_shape=[kh, kw],
                            strides=list(stride), pads=[padding[0], padding[1]] * 2, channels_last=1)
    g = helper.make_graph([node], "stem_conv", [helper.make_tensor_value_info("x", TensorProto.UINT8,
                                                                              [1, size, size, cin])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, out_size, out_size, cout])],
                          [numpy_helper.from_array(v, k) for k, v in t.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))
