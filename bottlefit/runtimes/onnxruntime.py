"""ONNX Runtime runner (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.runtimes.base import IOSpec, Runner, RuntimeUnavailable

# ONNX Runtime's type strings -> numpy (types numpy lacks, e.g. bfloat16, are left unchecked)
_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def _spec(arg: Any) -> IOSpec:
    dtype = _DTYPES.get(str(arg.type))
    # symbolic or unknown dimensions are dynamic; ONNX Runtime reports an unknown rank as [] (like a scalar)
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape) if arg.shape else None
    return IOSpec(str(arg.name), shape, np.dtype(dtype) if dtype is not None else None)


class OnnxRuntimeRunner(Runner):
    """``reference=True`` runs every node as the ONNX spec defines it (graph optimizations off): a Q/DQ graph
    then computes DequantizeLinear -> fp32 op -> QuantizeLinear, identical on any CPU up to float summation
    order. The default level fuses Q/DQ into QLinearConv and friends, whose int8 kernels differ per ISA (on
    x86 without VNNI their int16 pair sums saturate): that is the host's execution, not the artifact's meaning."""

    name = "onnxruntime"

    def __init__(self, path: Path, num_threads: int = 0, reference: bool = False) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeUnavailable("ONNX Runtime is not installed here: pip install onnxruntime") from e
        super().__init__(path)
        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
            opts.inter_op_num_threads = 1
        if reference:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        self.reference = reference
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._inputs = {s.name: s for s in map(_spec, self.session.get_inputs())}
        self._outputs = {s.name: s for s in map(_spec, self.session.get_outputs())}

    def input_specs(self) -> dict[str, IOSpec]:
        return dict(self._inputs)

    def output_specs(self) -> dict[str, IOSpec]:
        return dict(self._outputs)

    def infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(self._outputs)
        return dict(zip(names, self.session.run(names, inputs), strict=True))
