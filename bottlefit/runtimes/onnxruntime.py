"""ONNX Runtime runner (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OnnxRuntimeRunner:
    name = "onnxruntime"

    def __init__(self, path: Path, num_threads: int = 0, extra_outputs: bool = False) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if num_threads:
            opts.intra_op_num_threads = num_threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs, strict=True))
