"""A Triton Inference Server model repository for an export's split tail: what a device sends to ``bottlefit serve``
(a coded wire frame), decoded and run through the tail inside Triton.

``write_triton_repository(OUT, repo)`` writes, for the model name ``<arch>_tail`` that the clients already use:

- ``<arch>_tail``: an ensemble taking the BYTES tensor ``bottleneck`` (one wire frame per element, each with its
  codec and contract id in its header) and returning ``logits``;
- ``<arch>_tail_decode``: its first step (python backend, :mod:`bottlefit.serve.triton_decode` with
  ``boardcodec.py``, the export's contracts and codec tables in its version folder);
- ``<arch>_tail_fp32``: the tail taking the FP32 bottleneck, with dynamic batching: ``platform:
  "onnxruntime_onnx"`` (NVIDIA's containers), or with ``tail_backend="python"`` the same ``model.onnx`` run by
  ONNX Runtime in a python-backend model (:mod:`bottlefit.serve.triton_tail`) for servers without that backend.
  FP32 clients (``--wire fp32``, the boards' ``--fp32``) name this model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Artifact
from bottlefit.exporter.manifest import MANIFEST
from bottlefit.serve.contract import TargetExport, WireContract, find_targets, tail_model_name

DECODE_SUFFIX, FP32_SUFFIX = "_decode", "_fp32"
KSERVE_MANIFEST = "inferenceservice.yaml"
TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, the release the tests run
DEFAULT_STORAGE_URI = "pvc://bottlefit-models/triton"
_HERE = Path(__file__).parent


class TailBackend(StrEnum):
    """Which Triton backend runs the ONNX tail."""

    ONNXRUNTIME = "onnxruntime"  # platform onnxruntime_onnx: NVIDIA's containers
    PYTHON = "python"  # ONNX Runtime inside a python-backend model: any Triton with the python backend


@dataclass(frozen=True)
class RepositoryOptions:
    max_batch_size: int = 16
    max_queue_delay_us: int = 2000
    tail_backend: TailBackend = TailBackend.ONNXRUNTIME
    decode_instances: int = 2  # python-backend processes decoding frames side by side
    tail_threads: int = 1  # the python twin's intra-op threads (bottlefit serve's default)
    storage_uri: str = DEFAULT_STORAGE_URI  # where the KServe manifest says the repository lies


@dataclass(frozen=True)
class SplitContract:
    """One head's wire contract and its codec tables' bytes (None: no tables, codecs raw and zstd only)."""

    contract: WireContract
    tables: bytes | None

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


def config_pbtxt(name: str, tail: Artifact, max_batch_size: int, max_queue_delay_us: int = 2000,
                 instances: int = 1, backend: TailBackend = TailBackend.ONNXRUNTIME, threads: int = 1) -> str:
    """The tail's config.pbtxt (Triton's ModelConfig in protobuf text format). With ``max_batch_size`` > 0 the
    dims omit the batch dimension, as Triton requires."""
    ins, outs = tail.inputs, tail.outputs
    cut = 1 if max_batch_size > 0 else 0
    runs = 'platform: "onnxruntime_onnx"' if backend == TailBackend.ONNXRUNTIME else 'backend: "python"'
    lines = [f'name: "{name}"', runs, f"max_batch_size: {max_batch_size}",
             "input [", ",\n".join(_tensor(t.name, t.dtype, list(t.shape[cut:])) for t in ins), "]",
             "output [", ",\n".join(_tensor(t.name, t.dtype, list(t.shape[cut:])) for t in outs), "]",
             f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]"]
    if max_batch_size > 0:
        prefs = sorted({b for b in (max_batch_size // 2, max_batch_size) if b > 0})
        lines.append(f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(map(str, prefs))} ]\n"
                     f"  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    if backend == TailBackend.PYTHON:
        lines.append(f'parameters {{\n  key: "threads"\n  value {{ string_value: "{threads}" }}\n}}')
    return "\n".join(lines) + "\n"


def decode_config(name: str, sample_shape: tuple[int, ...], instances: int) -> str:
    """The decode step: BYTES frames [n] -> FP32 bottleneck [n, C, H, W] (no batching of its own: a request's
    frames are its batch; the tail's dynamic batcher joins requests)."""
    from bottlefit.serve.triton_decode import INPUT, OUTPUT

    dims = ", ".join(map(str, sample_shape))
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
            f'input [\n  {{\n    name: "{INPUT}"\n    data_type: TYPE_STRING\n    dims: [ -1 ]\n  }}\n]\n'
            f'output [\n  {{\n    name: "{OUTPUT}"\n    data_type: TYPE_FP32\n    dims: [ -1, {dims} ]\n  }}\n]\n'
            f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n")


def ensemble_config(name: str, decode: str, tail: str, tail_spec: Artifact) -> str:
    """The split tail as one model: frames -> decode -> tail -> logits."""
    from bottlefit.serve.triton_decode import INPUT, OUTPUT

    ti, to = tail_spec.inputs[0], tail_spec.outputs[0]
    odims = ", ".join(map(str, to.shape[1:]))
    step = ('  step [\n    {{\n      model_name: "{m}"\n      model_version: -1\n'
            '      input_map {{\n        key: "{ik}"\n        value: "{iv}"\n      }}\n'
            '      output_map {{\n        key: "{ok}"\n        value: "{ov}"\n      }}\n    }}\n  ]\n')
    return (f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: 0\n'
            f'input [\n  {{\n    name: "{INPUT}"\n    data_type: TYPE_STRING\n    dims: [ -1 ]\n  }}\n]\n'
            f'output [\n  {{\n    name: "{to.name}"\n    data_type: TYPE_FP32\n    dims: [ -1, {odims} ]\n'
            "  }\n]\nensemble_scheduling {\n"
            + step.format(m=decode, ik=INPUT, iv=INPUT, ok=OUTPUT, ov="decoded")
            + step.format(m=tail, ik=ti.name, iv="decoded", ok=to.name, ov=to.name) + "}\n")


def validate_config(text: str, where: Path) -> None:
    """Parse ``text`` into Triton's own ModelConfig message (tritonclient's model_config_pb2) where tritonclient is
    installed: an unknown field, a wrong type or enum name fails here rather than in tritonserver."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise AssertionError(f"{where}: not a Triton ModelConfig ({e})") from None


def split_contracts(targets: list[TargetExport]) -> list[SplitContract]:
    """Every int8 head's contract in ``targets`` (TargetExport) with its codec tables' bytes (shipped with the
    export, else fitted as ``bottlefit serve`` does)."""
    from bottlefit.serve.head import load_tables

    out = []
    for t in targets:
        for c in t.contracts:
            if c.quantized:
                out.append(SplitContract(c, load_tables(t, c).to_bytes()))
    return out


def write_triton_repository(out: Path, repo: Path, *, name: str | None = None,
                            options: RepositoryOptions | None = None) -> list[Path]:
    """``out``: the --out root of ``bottlefit export`` (every target's heads are served) or one OUT/<target>/ (or
    its manifest.json); one of them holds the ONNX tail. Writes the split repository into ``repo``; returns the
    files written."""
    out = Path(out)
    if out.name == MANIFEST:
        out = out.parent
    targets = find_targets(out)
    owner = next((t for t in targets if t.tail() is not None), None)
    if owner is None:
        raise UserError(f"{out}: no ONNX tail in any manifest; Triton needs `bottlefit export --target onnx`")
    for t in targets:
        if t.card != owner.card:
            raise UserError(f"{t.path}: its model card differs from {owner.path}'s; one export per repository")
    tail = owner.tail()
    assert tail is not None
    return write_split_repository(Path(repo), name or tail_model_name(owner.card), owner.path / tail.file,
                                  tail, split_contracts(targets), options or RepositoryOptions())


def write_split_repository(repo: Path, name: str, tail_onnx: Path, tail_spec: Artifact,
                           contracts: list[SplitContract], options: RepositoryOptions) -> list[Path]:
    """The ensemble ``name``, its decode step ``name_decode`` and the FP32 tail ``name_fp32`` under ``repo``."""
    from bottlefit.serve.triton_decode import CONTRACTS

    if not contracts:
        raise UserError(f"{tail_onnx.parent}: no int8 head in the export, so no wire frame to decode; export an int8 "
                        "head (--int8) or serve the FP32 tail alone")
    sample = tuple(int(d) for d in tail_spec.inputs[0].shape[1:])
    decode, fp32 = name + DECODE_SUFFIX, name + FP32_SUFFIX
    tail_dir, max_batch = write_repository(tail_onnx, tail_spec, repo, fp32, options)
    written = [tail_dir / "config.pbtxt", tail_dir / "1" / "model.onnx"]
    if options.tail_backend == TailBackend.PYTHON:
        shutil.copyfile(_HERE / "triton_tail.py", tail_dir / "1" / "model.py")
        written.append(tail_dir / "1" / "model.py")

    ddir = repo / decode
    version = ddir / "1"
    if version.exists():
        shutil.rmtree(version)  # tables of an earlier export must not linger
    (version / "codec").mkdir(parents=True)
    meta = []
    for sc in contracts:
        c = sc.contract
        rec = {**c.to_dict(), "nchw_shape": list(c.nchw_shape), "tables": None}
        if sc.tables is not None:
            rec["tables"] = f"codec/{c.contract_id}.npz"
            (version / rec["tables"]).write_bytes(sc.tables)
            written.append(version / rec["tables"])
        meta.append(rec)
    (version / CONTRACTS).write_text(json.dumps({"tail_shape": list(sample), "max_frames": max(max_batch, 1) * 4,
                                                 "contracts": meta}, indent=2, sort_keys=True) + "\n")
    for src, dst in (("triton_decode.py", "model.py"), ("boardcodec.py", "boardcodec.py")):
        shutil.copyfile(_HERE / src, version / dst)
    written += [version / CONTRACTS, version / "model.py", version / "boardcodec.py"]
    configs = {ddir / "config.pbtxt": decode_config(decode, sample, options.decode_instances),
               repo / name / "config.pbtxt": ensemble_config(name, decode, fp32, tail_spec)}
    (repo / name / "1").mkdir(parents=True, exist_ok=True)  # an ensemble's version folder is empty
    for path, text in configs.items():
        validate_config(text, path)
        path.write_text(text)
    (repo / KSERVE_MANIFEST).write_text(kserve_manifest(name, options.storage_uri))
    return sorted([*written, *configs, repo / KSERVE_MANIFEST])


def inference_service(name: str, storage_uri: str = DEFAULT_STORAGE_URI) -> dict[str, Any]:
    """A KServe ``InferenceService`` (v1beta1) serving the repository at ``storage_uri`` with KServe's Triton
    runtime over the Open Inference Protocol (v2): the clients then call ``/v2/models/<name>/infer`` on its URL."""
    import re

    k8s = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:45] or "bottlefit"
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {"name": k8s if k8s[0].isalpha() else f"m-{k8s}"[:45]},
            "spec": {"predictor": {"model": {
                "name": "kserve-container", "modelFormat": {"name": "triton"}, "protocolVersion": "v2",
                "runtime": "kserve-tritonserver",
                "storageUri": storage_uri,
                "resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "4", "memory": "4Gi"}}}}}}


def kserve_manifest(name: str, storage_uri: str = DEFAULT_STORAGE_URI) -> str:
    from importlib import metadata

    import yaml

    def pin(p: str) -> str:
        try:
            return f"{p}=={metadata.version(p)}"
        except metadata.PackageNotFoundError:  # a base install, without bottlefit[serve]
            return p

    pins = " ".join(pin(p) for p in ("constriction", "zstandard"))
    head = (f"# KServe InferenceService for the Triton repository beside this file (bottlefit triton).\n"
            f"# Copy the repository to {storage_uri} (or set storageUri), then: kubectl apply -f {KSERVE_MANIFEST}\n"
            "# The decode step imports constriction and zstandard for the zstd/entropy/context codecs (raw needs\n"
            f"# numpy only): build the runtime's image FROM {TRITON_IMAGE} with\n"
            f"#   pip install {pins}\n"
            "# and set spec.predictor.model.image to it.\n")
    return head + yaml.safe_dump(inference_service(name, storage_uri), sort_keys=False)


def write_repository(tail_onnx: Path, spec: Artifact, out_dir: Path, name: str,
                     options: RepositoryOptions | None = None) -> tuple[Path, int]:
    """``out_dir/<name>/config.pbtxt`` and ``1/model.onnx`` for the ONNX tail ``tail_onnx`` (its artifact record
    ``spec``: input/output names, types, shapes); returns (``out_dir/<name>``, the max batch size it got)."""
    o = options or RepositoryOptions()
    model_dir = out_dir / name
    onnx_path = model_dir / "1" / "model.onnx"
    max_batch_size = o.max_batch_size
    if not dynamic_batch_onnx(tail_onnx, onnx_path):
        max_batch_size = 0  # the graph only runs batch 1: Triton then takes the full shape, batch included
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        onnx_path.write_bytes(tail_onnx.read_bytes())
    text = config_pbtxt(name, spec, max_batch_size, o.max_queue_delay_us, backend=o.tail_backend,
                        threads=o.tail_threads)
    validate_config(text, model_dir / "config.pbtxt")
    (model_dir / "config.pbtxt").write_text(text)
    return model_dir, max_batch_size
