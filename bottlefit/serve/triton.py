"""A Triton Inference Server model repository for an export's tail, and the dynamic-batch tail it holds.

``write_triton_repository(OUT/onnx, repo)`` writes ``repo/<model>/config.pbtxt`` and ``repo/<model>/1/model.onnx``
(the tail with a dynamic batch dimension), with input/output names and types from the manifest, so a client of
``bottlefit serve`` sending FP32 bottlenecks talks to Triton unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bottlefit.errors import UserError
from bottlefit.exporter.manifest import MANIFEST, check_hashes, read_manifest
from bottlefit.serve.contract import tail_model_name

_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}


def dynamic_batch_onnx(src: Path, dst: Path) -> bool:
    """Copy the static-batch-1 ONNX ``src`` to ``dst`` with a symbolic batch dimension on every graph input and
    output. Returns False (and writes nothing) when the graph bakes the batch size into a Reshape/Expand shape
    constant, so it cannot run other batch sizes."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    for n in m.graph.node:
        if n.op_type in ("Reshape", "Expand", "Tile", "ConstantOfShape") and len(n.input) > 1:
            shape = consts.get(n.input[1])
            if shape is None or (shape.size and int(np.asarray(shape).ravel()[0]) == 1):
                return False
    for v in [*m.graph.input, *m.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if not dims or (dims[0].HasField("dim_value") and dims[0].dim_value != 1):
            return False
        dims[0].ClearField("dim_value")
        dims[0].dim_param = "batch"
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    return True


def _tensor(name: str, dtype: str, dims: list[int]) -> str:
    if dtype not in _TRITON_TYPES:
        raise UserError(f"tensor {name!r}: dtype {dtype} has no Triton type")
    d = ", ".join(map(str, dims))
    return f'  {{\n    name: "{name}"\n    data_type: {_TRITON_TYPES[dtype]}\n    dims: [ {d} ]\n  }}'


def config_pbtxt(name: str, tail: dict[str, Any], max_batch_size: int, max_queue_delay_us: int = 2000,
                 instances: int = 1) -> str:
    """The model's config.pbtxt (Triton's ModelConfig in protobuf text format). With ``max_batch_size`` > 0 the
    dims omit the batch dimension, as Triton requires."""
    ins, outs = tail["inputs"], tail["outputs"]
    cut = 1 if max_batch_size > 0 else 0
    lines = [f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(_tensor(t["name"], t["dtype"], list(t["shape"][cut:])) for t in ins), "]",
             "output [", ",\n".join(_tensor(t["name"], t["dtype"], list(t["shape"][cut:])) for t in outs), "]",
             f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]"]
    if max_batch_size > 0:
        prefs = sorted({b for b in (max_batch_size // 2, max_batch_size) if b > 0})
        lines.append(f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, prefs))} ]\n"
                     f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    return "\n".join(lines) + "\n"


def write_triton_repository(target: Path, out_dir: Path, *, name: str | None = None, max_batch_size: int = 16,
                            max_queue_delay_us: int = 2000) -> Path:
    """``target``: an OUT/<target>/ directory (or its manifest.json) holding the ONNX tail. Writes
    ``out_dir/<name>/config.pbtxt`` and ``out_dir/<name>/1/model.onnx``; returns ``out_dir/<name>``."""
    target = Path(target)
    if target.name == MANIFEST:
        target = target.parent
    manifest = read_manifest(target)
    tail = next((a for a in check_hashes(target, manifest) if a.role == "tail" and a.runtime == "onnxruntime"), None)
    if tail is None:
        raise UserError(f"{target}: no ONNX tail in the manifest; Triton needs `bottlefit export --target onnx`")
    name = name or tail_model_name(manifest.get("model_card", {}))
    return write_repository(target / tail.file, tail.to_dict(), Path(out_dir), name, max_batch_size,
                            max_queue_delay_us)


def write_repository(tail_onnx: Path, spec: dict[str, Any], out_dir: Path, name: str, max_batch_size: int = 16,
                     max_queue_delay_us: int = 2000) -> Path:
    """``out_dir/<name>/config.pbtxt`` and ``1/model.onnx`` for the ONNX tail ``tail_onnx`` (its artifact record
    ``spec``: input/output names, types, shapes); returns ``out_dir/<name>``."""
    model_dir = out_dir / name
    onnx_path = model_dir / "1" / "model.onnx"
    if not dynamic_batch_onnx(tail_onnx, onnx_path):
        max_batch_size = 0  # the graph only runs batch 1: Triton then takes the full shape, batch included
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        onnx_path.write_bytes(tail_onnx.read_bytes())
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, spec, max_batch_size, max_queue_delay_us))
    return model_dir
