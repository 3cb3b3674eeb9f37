"""The python-backend twin of the Triton repository's ONNX tail: ``model.onnx`` beside this file run in ONNX
Runtime inside Triton's Python, for Triton servers without the onnxruntime backend (it ships only in NVIDIA's
containers). Every request of the batch Triton's dynamic batcher formed runs as one ONNX Runtime call, as the
onnxruntime backend does; the session options are ``bottlefit serve``'s (one intra-op thread unless the model's
``threads`` parameter says otherwise).

``bottlefit triton --tail-backend python`` copies this file verbatim to ``<model>_fp32/1/model.py``. Python >= 3.8,
numpy and onnxruntime only.
"""

import json
import os

import numpy as np


class TritonPythonModel:
    """Triton's python-backend entry points."""

    def initialize(self, args):
        import onnxruntime as ort
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        cfg = json.loads(args["model_config"])
        self.input, self.output = cfg["input"][0]["name"], cfg["output"][0]["name"]
        params = cfg.get("parameters") or {}
        threads = int((params.get("threads") or {}).get("string_value") or 1)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        pb = self.pb
        xs = [pb.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        try:
            y = self.session.run([self.output], {self.input: np.concatenate(xs) if len(xs) > 1 else xs[0]})[0]
        except Exception as e:  # noqa: BLE001 - a runtime failure fails these requests, never the model
            err = pb.TritonError(f"bottlefit tail: {type(e).__name__}: {e}")
            return [pb.InferenceResponse(error=err) for _ in requests]
        out, pos = [], 0
        for x in xs:
            out.append(pb.InferenceResponse(output_tensors=[pb.Tensor(self.output, y[pos:pos + len(x)])]))
            pos += len(x)
        return out
