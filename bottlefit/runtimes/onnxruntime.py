"""ONNX Runtime runner (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OnnxRuntimeRunner:
    """``reference=True`` runs every node as the ONNX spec defines it (graph optimizations off): a Q/DQ graph
    then computes DequantizeLinear -> fp32 op -> QuantizeLinear, identical on any CPU up to float summation
    order. The default level fuses Q/DQ into QLinearConv and friends, whose int8 kernels differ per ISA (on
    x86 without VNNI their int16 pair sums saturate): that is the host's execution, not the artifact's meaning."""

    name = "onnxruntime"

    def __init__(self, path: Path, num_threads: int = 0, reference: bool = False) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
            opts.inter_op_num_threads = 1
        if reference:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        self.reference = reference
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs, strict=True))
