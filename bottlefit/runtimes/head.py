"""Run a head (or tail) artifact image by image, encoding inputs and decoding outputs exactly as its wire contract
says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.exporter import wire
from bottlefit.exporter.artifact import Artifact, Role, TensorSpec
from bottlefit.runtimes import Runner, get_runner

# What "reference semantics" means per runtime: the artifact's own definition, the same on every host.
REFERENCE_SEMANTICS = {
    "onnxruntime": "ONNX spec semantics (ONNX Runtime, graph optimizations off: DequantizeLinear -> fp32 op -> "
                   "QuantizeLinear)",
    "litert": "TFLite reference kernels (BUILTIN_REF: portable integer arithmetic)",
    "torch": "PyTorch eager",
    "ncnn": "ncnn's int8 scheme evaluated exactly in float64 (bottlefit.runtimes.ncnn: symmetric input scale, "
            "per-channel weights, integer accumulation, float dequantization)",
}


def reference_semantics(runtime: str) -> str:
    return REFERENCE_SEMANTICS.get(runtime, f"{runtime} on the target")


def open_artifact(artifact: Artifact, target_dir: Path, *, reference: bool = False, **runner_options: Any) -> Runner:
    """``artifact`` loaded in its runtime's runner: under its reference semantics (host-independent) with
    ``reference=True``, otherwise the runtime's default kernels on this host's CPU. A runner's ``evaluator``
    attribute, where it has one, says what computes the outputs (e.g. the vectorised TFLite reference evaluator or
    the reference interpreter; bottlefit.runtimes.litert.open_litert)."""
    if reference:
        runner_options["reference"] = True
    return get_runner(artifact.runtime, target_dir / artifact.file, **runner_options)


def run_head(artifact: Artifact, target_dir: Path, x: np.ndarray, *, reference: bool = False,
             **runner_options: Any) -> np.ndarray:
    """The artifact head's float NCHW outputs for float NCHW inputs (one image at a time: static batch 1).

    ``reference=True`` runs the artifact under its reference semantics (host-independent); otherwise the
    runtime's default kernels on this host's CPU run it."""
    return run_runner(open_artifact(artifact, target_dir, reference=reference, **runner_options), artifact, x)


def run_tail(artifact: Artifact, target_dir: Path, z: np.ndarray, *, reference: bool = False,
             **runner_options: Any) -> np.ndarray:
    """The artifact tail's float outputs (logits) for the float bottleneck ``z`` (NCHW, as the head's wire decode
    gives it; one sample at a time: static batch 1). Options as for :func:`run_head`."""
    return run_runner(open_artifact(artifact, target_dir, reference=reference, **runner_options), artifact, z)


def run_runner(runner: Runner, artifact: Artifact, x: np.ndarray) -> np.ndarray:
    """``artifact`` (a head or a tail) already loaded in ``runner``, sample by sample along axis 0: each float
    sample is encoded as the artifact's first input spec says, its first output decoded back to float, and for a
    float head whose wire carries int8 codes (:func:`wire_codes`) rounded onto them: what the tail receives."""
    ispec, ospec = artifact.inputs[0], artifact.outputs[0]
    codes = wire_codes(artifact)
    outs = []
    for i in range(x.shape[0]):
        res = runner.infer({ispec.name: wire.encode(ispec, x[i : i + 1])})
        y = wire.decode(ospec, res[ospec.name])
        outs.append(wire.decode(codes, wire.encode(codes, y)) if codes is not None else y)
    return np.concatenate(outs)


def wire_codes(artifact: Artifact) -> TensorSpec | None:
    """The int8 codes a float-output head puts on the wire (its ``quantization["output"]`` grid), as a spec; None
    for other artifacts. A Q/DQ head's float output already lies on that grid (the round trip is exact); an ncnn
    head's (dequantized conv output) does not: the board quantizes it before sending (run_head.py)."""
    rec = artifact.quantization.get("output") if artifact.role == Role.HEAD else None
    out = artifact.outputs[0] if artifact.outputs else None
    if out is None or out.dtype != "float32" or not isinstance(rec, dict) or not rec.get("scale") \
            or rec.get("dtype") not in ("int8", "uint8"):
        return None
    return TensorSpec(out.name, out.shape, str(rec["dtype"]), out.layout, float(rec["scale"]),
                      int(rec.get("zero_point", 0)))


def output_lsb(artifact: Artifact) -> float | None:
    """The size of one step of the head's int8 output, in float units (None for float heads)."""
    spec = artifact.outputs[0] if artifact.outputs else None
    if spec is not None and spec.scale:
        return float(spec.scale)
    for rec in (artifact.quantization.get("output"), {"scale": artifact.extra.get("output_scale")}):
        if isinstance(rec, dict) and rec.get("scale"):
            return float(rec["scale"])
    return None
