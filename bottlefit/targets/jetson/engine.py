"""Build a TensorRT engine through the Python API where TensorRT and a GPU are present (the board itself,
or an NVIDIA container). Same routes as build_engine.sh: Q/DQ ONNX, implicit int8 from a calibration
cache, and fp16/fp32. An engine only runs on the TensorRT version and GPU that built it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from bottlefit.calibration.trt_cache import read_cache
from bottlefit.errors import EnvironmentProblem, UserError
from bottlefit.files import atomic_write_bytes
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


# The build follows Polygraphy's TensorRT loaders (backend/trt/loader.py): check the request, create builder and
# network, parse the ONNX, create the builder config, build the serialized engine, save it. One step each.


def check_build_request(
    onnx_path: Path, profile: Profile, precision: str, calib_cache: str | os.PathLike[str] | None, force: bool
) -> bool:
    """Refuse what cannot give a meaningful engine before TensorRT is needed; returns whether the ONNX is Q/DQ."""
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
    return qdq


def local_trt_code(trt_version: str) -> int:
    """NV_TENSORRT_VERSION of a ``tensorrt.__version__`` such as "8.5.2.2" or "10.3.0"."""
    return trt_version_code(".".join(trt_version.split(".")[:3]))


def warn_if_not_the_board(trt_version: str, profile: Profile) -> None:
    """An engine runs only on the TensorRT (major.minor) that built it: say so when that is not the board's."""
    if local_trt_code(trt_version) // 100 != profile.trt_code // 100:
        warnings.warn(
            f"building with TensorRT {trt_version} for {profile.describe()}: the engine runs only "
            "here; build on the board for the board",
            stacklevel=3,  # build_engine's caller
        )


def network_creation_flags(trt: Any) -> int:
    """Explicit batch is required for ONNX on 8.x and the only mode (the flag deprecated) on 10.x."""
    if int(trt.__version__.split(".")[0]) >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


@dataclass
class ParsedNetwork:
    """Logger, builder, network and the parser that filled the network. The parser owns the weights, so all
    of them stay alive together until the engine is built."""

    logger: Any
    builder: Any
    network: Any
    parser: Any


def network_from_onnx(trt: Any, onnx_path: Path) -> ParsedNetwork:
    """Create the builder and an explicit-batch network, and parse the ONNX file into it."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_creation_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EnvironmentProblem(f"{onnx_path}: TensorRT {trt.__version__} ONNX parser failed: {errors}")
    return ParsedNetwork(logger, builder, network, parser)


@dataclass(frozen=True)
class ConfigPlan:
    """What the builder config gets, decided without TensorRT: names of ``trt.BuilderFlag`` members."""

    workspace_bytes: int
    set_flags: tuple[str, ...] = ()
    clear_flags: tuple[str, ...] = ()  # cleared only where this TensorRT has the flag
    calib_cache: Path | None = None  # implicit int8: replayed by a cache-only calibrator


def plan_config(
    profile: Profile, precision: str, qdq: bool, calib_cache: str | os.PathLike[str] | None, workspace_mib: int
) -> ConfigPlan:
    workspace = int(workspace_mib) << 20
    if precision == "fp16":
        return ConfigPlan(workspace, set_flags=("FP16",))
    if precision == "int8":
        # Explicit quantization (Q/DQ) carries its own scales: a cache would be ignored, so it is not read.
        cache = Path(calib_cache) if calib_cache is not None and not qdq else None
        return ConfigPlan(workspace, set_flags=("INT8",), calib_cache=cache)
    if profile.tf32:
        return ConfigPlan(workspace, clear_flags=("TF32",))  # an fp32 engine is the reference: no TF32 rounding
    return ConfigPlan(workspace)


def load_calibration_cache(path: Path, local_code: int) -> bytes:
    """The cache's bytes, refused when its header names another TensorRT (which would silently ignore it)."""
    code, _algo, _scales = read_cache(path)
    if code != local_code:
        raise UserError(
            f"{path}: cache header is for TensorRT {code}, this TensorRT is {local_code}; "
            "TensorRT would ignore it and calibrate on no data"
        )
    return path.read_bytes()


def create_config(trt: Any, builder: Any, plan: ConfigPlan) -> Any:
    """The builder config of ``plan``: workspace limit, precision flags, the cache calibrator."""
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):  # 8.4+
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    else:
        config.max_workspace_size = plan.workspace_bytes
    for flag in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if plan.calib_cache is not None:
        cache = load_calibration_cache(plan.calib_cache, local_trt_code(trt.__version__))
        config.int8_calibrator = _cache_calibrator(trt, cache)
    for flag in plan.clear_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    return config


def build_serialized_engine(parsed: ParsedNetwork, config: Any, onnx_path: Path, precision: str) -> bytes:
    serialized = parsed.builder.build_serialized_network(parsed.network, config)
    if serialized is None:
        # the builder (GPU, driver, TensorRT version) failed, not the user's input: exit 3
        raise EnvironmentProblem(f"{onnx_path}: TensorRT could not build a {precision} engine (see the log above)")
    return bytes(serialized)


def save_engine(engine_path: Path, engine: bytes) -> Path:
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(engine_path, engine)


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
    qdq = check_build_request(onnx_path, profile, precision, calib_cache, force)
    trt = import_tensorrt()
    warn_if_not_the_board(trt.__version__, profile)
    parsed = network_from_onnx(trt, onnx_path)
    config = create_config(trt, parsed.builder, plan_config(profile, precision, qdq, calib_cache, workspace_mib))
    return save_engine(engine_path, build_serialized_engine(parsed, config, onnx_path, precision))
