"""PyTorch head -> .tflite with litert-torch: full-integer int8 (PT2E, our calibration) and fp32.

int8 scheme: per-channel symmetric int8 weights, per-tensor affine int8 activations, int8 input and output
(litert-torch keeps the PT2E quantize/dequantize at the graph edges as int8 I/O, so nothing float is left for
the board to do). Activation ranges come from OUR calibration images and OUR observer choice: the PT2E
activation observer is a min/max observer that also feeds a BottleFit range observer and, when it derives
qparams, uses that observer's range (for "minmax" both are the same numbers). litert-torch's default
(histogram) clipped the bottleneck range (measured). Observer "search" is one recipe with the Q/DQ heads:
the per-tensor range search runs on the ONNX export of the module converted here (``search_table``), and each
PT2E observer takes the searched asymmetric int8 parameters of the tensor whose values it saw on the first
calibration image (``bottlefit.exporter.qdq.match_range``); a tensor found nowhere keeps its own search.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import TensorSpec
from bottlefit.exporter.head_rewrite import RewrittenHead
from bottlefit.files import atomic_write_bytes

INSTALL_HINT = "pip install 'bottlefit[rpi]'"
OBSERVERS = ("minmax", "percentile", "entropy", "mse", "search")


# ---------------------------------------------------------------- range observers (ours)


class _MinMax:
    """Fallback min/max observer with the calibration observers' interface (update / range)."""

    def __init__(self) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")

    def update(self, x: np.ndarray) -> None:
        self.lo = min(self.lo, float(np.min(x)))
        self.hi = max(self.hi, float(np.max(x)))

    def range(self) -> tuple[float, float]:
        return self.lo, self.hi


def range_observer(name: str) -> Any:
    """A BottleFit range observer: ``update(ndarray)`` as data flows, ``range() -> (lo, hi)`` once."""
    if name not in OBSERVERS:
        raise UserError(f"unknown observer {name!r}; choose one of: {', '.join(OBSERVERS)}")
    try:
        from bottlefit.calibration import make_observer  # the shared observers, when present
    except ImportError:
        make_observer = None
    if make_observer is not None:
        return make_observer(name)
    if name != "minmax":
        raise UserError(f"observer {name!r} needs bottlefit.calibration's observers, missing in this build; "
                        "use --observer minmax")
    return _MinMax()


# ---------------------------------------------------------------- litert-torch plumbing


def require_litert_torch() -> Any:
    try:
        import litert_torch
    except ImportError as e:
        raise UserError(f"the rpi target needs litert-torch and ai-edge-litert ({e.name} is missing): "
                        f"{INSTALL_HINT}") from e
    return litert_torch


@contextlib.contextmanager
def _quiet_litert() -> Iterator[None]:
    # litert-torch prints a progress tree per conversion; the command's own log says what happens.
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


@functools.cache
def _observer_class() -> type:
    from torchao.quantization.pt2e.observer import MinMaxObserver

    class BottleFitActObserver(MinMaxObserver):
        """PT2E min/max observer whose qparams come from a BottleFit range observer."""

        def __init__(self, method: str = "minmax", table: Any = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.method = method
            self.ours = range_observer(method)
            self.table = table  # list[RangeEntry] of the ONNX range search, for method "search"
            self.first: np.ndarray | None = None
            self.matched: str | None = None

        def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
            x = x_orig.detach().float().cpu().numpy()
            if self.first is None:
                self.first = x.copy()  # the first calibration image: finds this tensor in the search table
            self.ours.update(x)
            return super().forward(x_orig)

        @torch.jit.export
        def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
            entry = None
            if self.table and self.first is not None:
                from bottlefit.exporter.qdq import match_range

                entry = match_range(self.table, self.first)
            if entry is not None:
                # the ORT head's parameters for the same tensor, exactly: one recipe, one fidelity
                self.matched = entry.name
                lo = (-128 - entry.zero_point) * entry.scale
                hi = (127 - entry.zero_point) * entry.scale
            else:
                lo, hi = self.ours.range()
            # the affine int8 grid must contain 0 exactly, as MinMaxObserver's own math assumes
            lo_t = torch.tensor(min(float(lo), 0.0), dtype=torch.float32)
            hi_t = torch.tensor(max(float(hi), 0.0), dtype=torch.float32)
            scale, zp = self._calculate_qparams(lo_t, hi_t)
            if entry is not None:
                scale = torch.full_like(scale, entry.scale)
                zp = torch.full_like(zp, entry.zero_point)
            return scale, zp

    return BottleFitActObserver


def _quantizer(observer: str, table: Any = None) -> Any:
    from litert_torch.quantize import pt2e_quantizer as pq

    base = pq.get_symmetric_quantization_config(is_per_channel=True)  # weights: per-channel symmetric int8
    act = dataclasses.replace(
        base.input_activation,
        observer_or_fake_quant_ctr=_observer_class().with_args(method=observer, table=table, eps=2**-12),
    )
    cfg = dataclasses.replace(base, input_activation=act, output_activation=act)
    return pq.PT2EQuantizer().set_global(cfg)


def _wrap_layout(module: nn.Module, layout: str) -> nn.Module:
    if layout == "NHWC":
        import litert_torch

        # the transposes are absorbed by the converter's layout pass: none is left at the graph edges
        return litert_torch.to_channel_last_io(module, args=[0], outputs=[0]).eval()
    return module


def search_table(module: nn.Module, images: np.ndarray) -> list[Any]:
    """The per-tensor range search of the Q/DQ heads (asymmetric int8, as TFLite's activations), run on the
    ONNX export of the very module litert-torch converts: its PT2E observers find their tensors in it."""
    import tempfile

    from bottlefit.exporter.onnx import export_onnx
    from bottlefit.exporter.qdq import prepare_fp32
    from bottlefit.exporter.qdq import search_table as qdq_search_table

    with tempfile.TemporaryDirectory(prefix="bottlefit-tflite-search-") as tmp:
        example = torch.from_numpy(np.ascontiguousarray(images[:1], dtype=np.float32)).clone()
        fp32 = export_onnx(module, example, Path(tmp) / "head.onnx", 17, "input", "output")
        model, _ = prepare_fp32(fp32.path)
    return qdq_search_table(model, images, symmetric=False, activation_dtype="int8")


def _to_layout(x: np.ndarray, layout: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return t.permute(0, 2, 3, 1).contiguous() if layout == "NHWC" else t


def convert_bytes(
    rw: RewrittenHead,
    images: np.ndarray,
    *,
    int8: bool,
    layout: str = "NHWC",
    observer: str = "minmax",
    stats: dict[str, Any] | None = None,
) -> bytes:
    """The .tflite flatbuffer for the rewritten head (batch 1). ``images``: float32 NCHW calibration set.

    ``observer`` "search": the Q/DQ heads' per-tensor range search (``search_table``) decides every activation
    it finds by value; others keep their own search observer. ``stats`` (when given) receives how many
    observers took the search table's parameters (``from_search``) and how many their own (``own_range``)."""
    litert_torch = require_litert_torch()
    module = _wrap_layout(rw.module, layout)
    example = (_to_layout(images[:1], layout),)
    with _quiet_litert(), torch.no_grad():
        if not int8:
            return bytes(litert_torch.convert(module, example).model_content())
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        table = search_table(rw.module, images) if observer == "search" else None
        quantizer = _quantizer(observer, table)
        graph = torch.export.export(module, example).module()
        prepared = prepare_pt2e(graph, quantizer)
        # one image at a time: the exported graph is specialised to batch 1
        for i in range(len(images)):
            prepared(_to_layout(images[i : i + 1], layout))
        if stats is not None:
            obs = [m for m in prepared.modules() if type(m).__name__ == "BottleFitActObserver"]
            for m in obs:
                m.calculate_qparams()
            stats["observers"] = len(obs)
            stats["from_search"] = sorted({m.matched for m in obs if m.matched})
            stats["own_range"] = sum(1 for m in obs if not m.matched)
        quantized = move_exported_model_to_eval(convert_pt2e(prepared, fold_quantize=False))
        # the graph computes inference already (BN in eval form, no dropout); the flag is what the converter
        # checks (exported modules refuse .eval()), and a training-mode warning would be false
        quantized.training = False
        edge = litert_torch.convert(quantized, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        return bytes(edge.model_content())


# ---------------------------------------------------------------- reading the .tflite back


@dataclass
class FloatOp:
    index: int
    op: str
    tensors: list[str]
    modules: list[str]  # original PyTorch module paths, where the tensor names tell

    def describe(self) -> str:
        where = ", ".join(self.modules) if self.modules else "unknown module"
        return f"{self.op} (op {self.index}, from {where})"


@dataclass
class TFLiteInfo:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ops: list[str]
    float_ops: list[FloatOp] = field(default_factory=list)
    ranges: dict[str, Any] = field(default_factory=dict)  # observer "search": what took the searched ranges


def _spec(d: dict[str, Any], layout: str) -> TensorSpec:
    dtype = np.dtype(d["dtype"]).name
    scale, zp = d["quantization"]
    integer = dtype in ("int8", "uint8")
    return TensorSpec(
        name=str(d["name"]),
        shape=tuple(int(s) for s in d["shape"]),
        dtype=dtype,
        layout=layout if len(d["shape"]) == 4 else "",
        scale=float(scale) if integer else None,
        zero_point=int(zp) if integer else None,
    )


def inspect_tflite(data: bytes, layout: str, rw: RewrittenHead | None = None) -> TFLiteInfo:
    """I/O specs, the op list, and every op that touches a float32 tensor (named by its PyTorch module)."""
    from bottlefit.runtimes.litert import interpreter_module

    # the one interpreter import (RuntimeUnavailable, exit 3, when none is installed), as parity's runner uses
    mod = interpreter_module()
    # without the default delegate: with XNNPACK applied, the op list would show DELEGATE nodes instead
    interp = mod.Interpreter(
        model_content=data, experimental_op_resolver_type=mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    ops: list[str] = []
    floats: list[FloatOp] = []
    for op in interp._get_ops_details():
        ops.append(op["op_name"])
        idx = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0 and i in tensors]
        if any(np.dtype(tensors[i]["dtype"]) == np.float32 for i in idx):
            names = [str(tensors[i]["name"]) for i in idx]
            modules: list[str] = []
            if rw is not None:
                for n in names:
                    modules += [m for m in rw.origin_of_tensor(n) if m not in modules]
            floats.append(FloatOp(int(op["index"]), str(op["op_name"]), names, modules))
    return TFLiteInfo(
        inputs=[_spec(d, layout) for d in interp.get_input_details()],
        outputs=[_spec(d, layout) for d in interp.get_output_details()],
        ops=ops,
        float_ops=floats,
    )


def export_tflite(
    rw: RewrittenHead,
    images: np.ndarray,
    path: Path,
    *,
    int8: bool,
    layout: str = "NHWC",
    observer: str = "minmax",
    allow_float_ops: bool = False,
    log: Callable[[str], object] = print,
) -> TFLiteInfo:
    """Convert, check, then write ``path`` atomically. A failure leaves no file behind."""
    layout = layout.upper()
    if layout not in ("NHWC", "NCHW"):
        raise UserError(f"unknown layout {layout!r}; choose nhwc or nchw")
    try:
        stats: dict[str, Any] = {}
        data = convert_bytes(rw, images, int8=int8, layout=layout, observer=observer, stats=stats)
    except UserError:
        raise
    except Exception as e:  # the converter's own errors are long; the first line says what failed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path.name}: litert-torch could not convert the head ({type(e).__name__}: "
                        f"{first[:300]})") from e
    info = inspect_tflite(data, layout, rw)
    info.ranges = stats
    if int8 and info.float_ops:
        listed = "; ".join(f.describe() for f in info.float_ops)
        if not allow_float_ops:
            raise UserError(f"{path.name}: the int8 head keeps {len(info.float_ops)} float op(s): {listed}; "
                            "pass --allow-float-ops to accept a partly-float head")
        log(f"warning: {path.name}: {len(info.float_ops)} float op(s) kept (--allow-float-ops): {listed}")
    atomic_write_bytes(path, data)
    return info
