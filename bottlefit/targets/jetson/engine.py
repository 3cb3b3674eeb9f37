"""Build a TensorRT engine through the Python API where TensorRT and a GPU are present (the board itself,
or an NVIDIA container). Same routes as build_engine.sh: Q/DQ ONNX, implicit int8 from a calibration
cache, and fp16/fp32. An engine only runs on the TensorRT version and GPU that built it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import onnx

from bottlefit.calibration.trt_cache import atomic_write_bytes, read_cache
from bottlefit.errors import UserError
from bottlefit.runtimes.tensorrt import import_tensorrt
from bottlefit.targets.jetson.profiles import PRECISIONS, Profile, check_request, trt_version_code


def _cache_calibrator(trt: Any, cache: bytes) -> Any:
    """An entropy calibrator that only replays the cache. If TensorRT rejects the cache it asks for data,
    gets none, and the build fails: better than trtexec's silent fallback to random data."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return CacheCalibrator()


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    profile: Profile,
    precision: str,
    calib_cache: str | os.PathLike[str] | None = None,
    workspace_mib: int = 1024,
    force: bool = False,
) -> Path:
    """Parse ``onnx_path``, build for ``precision`` and write the serialized engine atomically.

    int8 needs either Q/DQ nodes in the ONNX (explicit quantization) or ``calib_cache`` (implicit).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    model = onnx.load(str(onnx_path), load_external_data=False)
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    reasons = check_request(profile, precision, opset, force=force)
    if reasons and not force:
        raise UserError("; ".join(reasons))
    qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    if precision == "int8" and not qdq and calib_cache is None:
        # trtexec would use placeholder ranges here: an int8 engine with meaningless numbers.
        raise UserError(f"{onnx_path}: int8 needs Q/DQ nodes in the ONNX or a calibration cache (calib_cache)")
    del model

    trt = import_tensorrt()
    local_code = trt_version_code(".".join(trt.__version__.split(".")[:3]))
    if local_code // 100 != profile.trt_code // 100:
        warnings.warn(
            f"building with TensorRT {trt.__version__} for {profile.describe()}: the engine runs only "
            "here; build on the board for the board",
            stacklevel=2,
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # Explicit batch is required for ONNX on 8.x and the only mode (flag deprecated) on 10.x.
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT {trt.__version__} ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):  # 8.4+
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    else:
        config.max_workspace_size = int(workspace_mib) << 20
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if calib_cache is not None and not qdq:
            code, _algo, _scales = read_cache(calib_cache)
            if code != local_code:
                raise UserError(
                    f"{calib_cache}: cache header is for TensorRT {code}, this TensorRT is {local_code}; "
                    "TensorRT would ignore it and calibrate on no data"
                )
            config.int8_calibrator = _cache_calibrator(trt, Path(calib_cache).read_bytes())
    elif profile.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # an fp32 engine is the reference: no TF32 rounding

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"{onnx_path}: TensorRT could not build a {precision} engine (see the log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine_path, bytes(serialized))
    return engine_path
