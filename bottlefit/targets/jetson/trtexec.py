"""trtexec on the board, prepared on the host: command lines, ``--loadInputs`` bytes, ``--exportOutput`` JSON,
golden files and the generated ``build_engine.sh``. Pure functions over profiles, paths and arrays.

Formats and flags (exportOutput, loadInputs, flags per version, int8): docs/tensorrt.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.errors import UserError
from bottlefit.files import atomic_write_bytes
from bottlefit.targets.jetson.profiles import Profile, check_request

TRTEXEC_DEFAULT = "/usr/src/tensorrt/bin/trtexec"  # JetPack's install path; trtexec is not on PATH there
GOLDEN_FORMAT = "bottlefit-golden-1"
# parity's metric names: errors must stay <= their tolerance, cosine and sqnr_db >= theirs.
TOLERANCE_KEYS = ("max_abs_error", "mean_abs_error", "cosine", "sqnr_db")

# Everything one bundle refers to, relative to the bundle directory; callers override what differs.
DEFAULT_FILES: dict[str, Any] = {
    "onnx": "head.onnx",
    "qdq_onnx": "head.qdq.onnx",
    "calib": "head.calib.cache",
    "inputs": ["input"],  # graph input names, in graph order
    "golden_dir": "golden",
    "engine_dir": "engines",
    "results_dir": "results",
    "verify": "verify_on_board.py",
}


@dataclass(frozen=True)
class Route:
    """One way to get an engine from the bundle."""

    name: str
    onnx_key: str  # key in the files mapping
    precision: str
    flags: tuple[str, ...]
    calib: bool = False  # implicit int8 from head.calib.cache


ROUTES: dict[str, Route] = {
    r.name: r
    for r in (
        Route("qdq", "qdq_onnx", "int8", ("--int8",)),  # explicit Q/DQ: scales live in the ONNX
        Route("cache", "onnx", "int8", ("--int8",), calib=True),  # implicit int8 from TensorRT's own cache
        Route("fp16", "onnx", "fp16", ("--fp16",)),
        Route("fp32", "onnx", "fp32", ()),  # reference engine for fp32 comparisons
    )
}


# ---------------------------------------------------------------------------------------------- file names


def _files(files: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = dict(DEFAULT_FILES)
    merged.update(files or {})
    return merged


def golden_file_names(names: Sequence[str], kind: str) -> dict[str, str]:
    """``<kind>.<name>.bin`` with path-unsafe characters replaced; a numeric suffix keeps them distinct.

    trtexec splits ``--loadInputs`` items at ',' and the last ':', so neither may appear in a file name.
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".") or "tensor"
        base, n = f"{kind}.{stem}", 1
        while f"{base}.bin" in used:
            n += 1
            base = f"{kind}.{stem}-{n}"
        used.add(f"{base}.bin")
        out[name] = f"{base}.bin"
    return out


# ------------------------------------------------------------------------------------- --loadInputs bytes


def load_inputs_bytes(array: np.ndarray, dtype: str = "float32") -> bytes:
    """Bytes trtexec copies verbatim into an input binding: little-endian (the Jetson's order), C-order.

    ``dtype`` is the engine binding type (float32 unless --inputIOFormats says otherwise). Integer bindings
    take values as they are: quantize before calling (int8 I/O uses round(x / scale) clipped to ±127).
    """
    kinds = {"float32": "<f4", "float16": "<f2", "int8": "i1", "int32": "<i4", "bool": "?"}
    if dtype not in kinds:
        raise UserError(f"--loadInputs: unsupported binding type {dtype!r}; choose one of: {', '.join(kinds)}")
    arr = np.asarray(array)
    if dtype in ("int8", "int32") and not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"--loadInputs: an {dtype} binding needs integer codes, got {arr.dtype}")
    target = np.dtype(kinds[dtype])
    if np.issubdtype(target, np.integer):
        info = np.iinfo(target)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise UserError(f"--loadInputs: values outside {dtype} range [{info.min}, {info.max}]")
    data = np.ascontiguousarray(arr, dtype=target).tobytes(order="C")
    # TensorRT 8.2 silently accepts a short file and reads garbage for the rest: the size must be exact.
    assert len(data) == arr.size * target.itemsize
    return data


def write_load_inputs(path: str | os.PathLike[str], array: np.ndarray, dtype: str = "float32") -> Path:
    path = Path(path)
    atomic_write_bytes(path, load_inputs_bytes(array, dtype))
    return path


def load_inputs_flag(paths: Mapping[str, str]) -> str:
    """``--loadInputs=name:file,...``; trtexec splits items at ',' and each item at its last ':'."""
    items = []
    for name, file in paths.items():
        if "," in name:
            raise UserError(f"input name {name!r} contains ',', which trtexec's --loadInputs cannot express")
        if "," in file or ":" in file:
            raise UserError(f"--loadInputs file {file!r} may not contain ',' or ':'")
        items.append(f"{name}:{file}")
    return "--loadInputs=" + ",".join(items)


# ------------------------------------------------------------------------------------ --exportOutput JSON


def format_value(value: Any) -> str:
    """One element the way trtexec streams it: floats with C++ ostream defaults (6 significant digits,
    %g rules), integers in decimal, bool as 1/0; NaN/Inf as glibc prints them (nan, -nan, inf, -inf)."""
    if isinstance(value, bool | np.bool_):
        return "1" if value else "0"
    if isinstance(value, int | np.integer):
        return str(int(value))
    x = float(value)  # fp16/bf16/fp32 -> double exactly, like the C++ float->double promotion
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    return f"{x:g}"  # Python's g follows C's %g: 1e-07, 1.23457e+06, -0, 100000


def format_export_output(outputs: Mapping[str, np.ndarray]) -> str:
    """The exact text trtexec writes for ``--exportOutput`` (comma-first, three lines per tensor).

    trtexec orders tensors by hash; here they follow ``outputs``. Readers must match by name.
    """
    lines = ["["]
    for i, (name, array) in enumerate(outputs.items()):
        arr = np.asarray(array)
        if arr.dtype.kind == "f" and arr.dtype.itemsize > 4:
            arr = arr.astype(np.float32)  # engines have no fp64 bindings; print what the board would
        values = ", ".join(format_value(v) for v in arr.reshape(-1).tolist())
        lines.append(f'{"  " if i == 0 else ", "}{{ "name" : "{name}"')
        lines.append(f'  , "dimensions" : "{"x".join(str(d) for d in arr.shape)}"')
        lines.append(f'  , "values" : [ {values} ]')
        lines.append("  }")
    lines.append("]")
    return "\n".join(lines) + "\n"


def write_export_output(path: str | os.PathLike[str], outputs: Mapping[str, np.ndarray]) -> Path:
    path = Path(path)
    atomic_write_bytes(path, format_export_output(outputs).encode("utf-8"))
    return path


_NAME_RE = re.compile(r'^\s*,?\s*\{\s*"name"\s*:\s*"(.*)"\s*$')  # names are not escaped: greedy to the last "
_DIMS_RE = re.compile(r'^\s*,\s*"dimensions"\s*:\s*"([0-9x]*)"\s*$')
_VALUES_RE = re.compile(r'^\s*,\s*"values"\s*:\s*\[(.*)\]\s*$')
_TOKEN_RE = re.compile(r"-?(?:nan|inf|(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)", re.IGNORECASE)


def parse_export_output(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read trtexec's ``--exportOutput`` file; see parse_export_output_text."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: trtexec output file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not text (TensorRT 8.2 writes int8 outputs as raw bytes)") from None
    return parse_export_output_text(text, where=str(path))


def parse_export_output_text(text: str, where: str = "exportOutput") -> dict[str, np.ndarray]:
    """Parse ``--exportOutput`` text, matching tensors by name (trtexec writes them in hash order).

    Not JSON: names are unescaped and NaN/Inf are bare tokens, so this reads the fixed line layout.
    Returns float64 arrays shaped by ``dimensions`` (int outputs are exact in float64).
    """
    lines = text.split("\n")
    if not lines or lines[0].strip() != "[":
        raise UserError(f"{where}:1: expected '[' (is this a trtexec --exportOutput file?)")
    out: dict[str, np.ndarray] = {}
    i = 1
    while i < len(lines) and lines[i].strip() not in ("]", ""):
        block = lines[i : i + 4]
        m_name = _NAME_RE.match(block[0]) if block else None
        m_dims = _DIMS_RE.match(block[1]) if len(block) > 1 else None
        m_vals = _VALUES_RE.match(block[2]) if len(block) > 2 else None
        if not (m_name and m_dims and m_vals and len(block) > 3 and block[3].strip() == "}"):
            raise UserError(f"{where}:{i + 1}: unexpected layout (expected name, dimensions, values lines)")
        name = m_name.group(1)
        shape = tuple(int(d) for d in m_dims.group(1).split("x")) if m_dims.group(1) else ()
        tokens = [t.strip() for t in m_vals.group(1).split(",")] if m_vals.group(1).strip() else []
        bad = next((t for t in tokens if not _TOKEN_RE.fullmatch(t)), None)
        if bad is not None:
            raise UserError(f"{where}:{i + 3}: output {name!r}: value {bad[:20]!r} is not a number")
        values = np.array([float(t) for t in tokens], dtype=np.float64)
        if values.size != math.prod(shape):
            raise UserError(f"{where}:{i + 3}: output {name!r}: {values.size} values for dimensions {shape}")
        if name in out:
            raise UserError(f"{where}:{i + 1}: output {name!r} appears twice")
        out[name] = values.reshape(shape)
        i += 4
    if i >= len(lines) or lines[i].strip() != "]":
        raise UserError(f"{where}: missing the closing ']' (truncated file?)")
    return out


# ------------------------------------------------------------------------------------------- golden files


def write_golden(
    golden_dir: str | os.PathLike[str],
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    tolerances: Mapping[str, Mapping[str, float]],
    output_scales: Mapping[str, float] | None = None,
    made_with: str | None = None,
) -> Path:
    """Golden data the stdlib-only board verifier reads (format ``bottlefit-golden-1``):

    ``input.<name>.bin`` (float32 LE, fed to trtexec via --loadInputs), ``output.<name>.bin`` (float32 LE,
    the host reference) and ``golden.json`` {format, inputs[], outputs[] (name, file, shape, dtype, scale),
    tolerances{precision: {max_abs_error, mean_abs_error, cosine, sqnr_db}}}. ``scale`` is the int8 dequant
    scale of an output, used when the engine emits int8 codes. Returns the golden.json path.
    """
    golden = Path(golden_dir)
    golden.mkdir(parents=True, exist_ok=True)
    for precision, tol in tolerances.items():
        unknown = set(tol) - set(TOLERANCE_KEYS)
        if unknown:
            raise UserError(f"tolerances[{precision!r}]: unknown keys {sorted(unknown)}; use {TOLERANCE_KEYS}")
    scales = dict(output_scales or {})
    doc: dict[str, Any] = {"format": GOLDEN_FORMAT, "inputs": [], "outputs": [], "tolerances": {}}
    for kind, arrays in (("input", inputs), ("output", outputs)):
        for name, file in golden_file_names(list(arrays), kind).items():
            arr = np.asarray(arrays[name], dtype=np.float32)
            write_load_inputs(golden / file, arr)
            entry: dict[str, Any] = {"name": name, "file": file, "shape": list(arr.shape), "dtype": "float32"}
            if kind == "output":
                entry["scale"] = float(scales[name]) if name in scales else None
            doc[f"{kind}s"].append(entry)
    doc["tolerances"] = {p: {k: float(v) for k, v in t.items()} for p, t in tolerances.items()}
    if made_with:
        doc["made_with"] = made_with  # what computed the golden outputs (never a host kernel that deviates)
    path = golden / "golden.json"
    atomic_write_bytes(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"))
    return path


# ----------------------------------------------------------------------------------------- command lines


def _route(name: str) -> Route:
    if name not in ROUTES:
        raise UserError(f"unknown engine route {name!r}; choose one of: {', '.join(ROUTES)}")
    return ROUTES[name]


def engine_path(route: str, files: Mapping[str, Any] | None = None) -> str:
    return f"{_files(files)['engine_dir']}/head.{route}.engine"


def export_output_path(route: str, files: Mapping[str, Any] | None = None) -> str:
    return f"{_files(files)['results_dir']}/{route}.output.json"


def build_args(
    profile: Profile,
    route: str,
    files: Mapping[str, Any] | None = None,
    *,
    workspace_mib: int = 1024,
    fp16: bool = False,
    int8_output: bool = False,
    force: bool = False,
) -> list[str]:
    """trtexec arguments that build (and only build) one route's engine for ``profile``.

    ``fp16`` lets int8 routes run their non-quantized layers in fp16. ``int8_output`` makes the engine emit
    int8 codes (int8 routes only: the cache route takes the output's range from the cache itself, the qdq
    route from the Q/DQ ONNX, which must then end in QuantizeLinear).
    """
    r = _route(route)
    f = _files(files)
    reasons = check_request(profile, r.precision, opset=0, force=force)  # opset: lint_onnx checks it
    if reasons and not force:
        raise UserError("; ".join(reasons))
    args = [f"--onnx={f[r.onnx_key]}", *r.flags]
    if fp16 and r.precision == "int8":
        args.append("--fp16")
    if r.calib:
        args.append(f"--calib={f['calib']}")
    if int8_output:
        if r.precision != "int8":
            raise UserError(f"route {route!r}: int8 outputs need an int8 route (qdq or cache)")
        if not profile.int8_export_numeric:
            raise UserError(
                f"{profile.describe()}: trtexec writes int8 outputs as raw bytes, so --exportOutput "
                "cannot be checked; keep float outputs on this board"
            )
        # One broadcast entry: 8.2/8.5 check a per-output list against the number of INPUTS (a bug).
        args.append("--outputIOFormats=int8:chw")
    if r.precision == "fp32" and profile.tf32:
        args.append("--noTF32")  # Ampere runs fp32 layers as TF32 otherwise: not an fp32 reference
    args += [
        f"--saveEngine={engine_path(route, f)}",
        f"--timingCacheFile={f['engine_dir']}/timing.cache",
        profile.workspace(workspace_mib),
        profile.build_only_flag,
    ]
    return args


def infer_args(route: str, files: Mapping[str, Any] | None = None) -> list[str]:
    """One deterministic inference on the golden inputs, outputs written as JSON (no timing loop)."""
    f = _files(files)
    names = list(f["inputs"])
    inputs = {n: f"{f['golden_dir']}/{file}" for n, file in golden_file_names(names, "input").items()}
    return [
        f"--loadEngine={engine_path(route, f)}",
        load_inputs_flag(inputs),
        f"--exportOutput={export_output_path(route, f)}",
        "--iterations=1",
        "--warmUp=0",
        "--duration=0",
        "--avgRuns=1",
    ]


def verify_args(route: str, files: Mapping[str, Any] | None = None, *, int8_output: bool = False) -> list[str]:
    f = _files(files)
    args = [f["verify"], f"--golden={f['golden_dir']}", f"--output={export_output_path(route, f)}"]
    args += [f"--precision={_route(route).precision}"]
    if int8_output:
        args.append("--engine-output=int8")
    return args


def _shell(args: Iterable[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def render_build_script(
    profile: Profile,
    routes: Sequence[str],
    files: Mapping[str, Any] | None = None,
    *,
    workspace_mib: int = 1024,
    fp16: bool = False,
    int8_output: bool = False,
    force: bool = False,
    default_routes: Sequence[str] | None = None,
) -> str:
    """``build_engine.sh``: one bash function per route (build, infer once, verify); runs the routes named on
    its command line, else ``default_routes`` (default: all), keeps going after a failed route, exits 1 if any
    failed and 2 on usage errors."""
    if not routes:
        raise UserError("render_build_script: no routes given")
    defaults = list(default_routes or routes)
    if not set(defaults) <= set(routes):
        raise UserError(f"render_build_script: default routes {defaults} are not all among {list(routes)}")
    f = _files(files)
    body = [_route_function(profile, name, f, workspace_mib=workspace_mib, fp16=fp16, int8_output=int8_output,
                            force=force) for name in routes]
    return _script_prelude(profile, routes, defaults, f) + "\n".join(body) + "\n" + _script_dispatch(routes, defaults)


def _route_function(profile: Profile, name: str, f: Mapping[str, Any], *, workspace_mib: int, fp16: bool,
                    int8_output: bool, force: bool) -> str:
    """``route_NAME() { ... }``: build the route's engine, run it once on the golden inputs, verify the outputs."""
    r = _route(name)
    out8 = int8_output and r.precision == "int8"
    build = _shell(build_args(profile, name, f, workspace_mib=workspace_mib, fp16=fp16, int8_output=out8, force=force))
    log = shlex.quote(f"{f['results_dir']}/{name}")
    return (
        f"route_{name}() {{\n"
        f'  echo "== {name}: building the {r.precision} engine"\n'
        # set -e is off inside a function called from `if`: every step returns its own failure.
        f'  "$TRTEXEC" {build} 2>&1 | tee {log}.build.log || return\n'
        f'  echo "== {name}: one inference on the golden inputs"\n'
        f'  "$TRTEXEC" {_shell(infer_args(name, f))} 2>&1 | tee {log}.infer.log || return\n'
        f'  "$PYTHON" {_shell(verify_args(name, f, int8_output=out8))}\n'
        "}\n"
    )


def _script_prelude(profile: Profile, routes: Sequence[str], defaults: Sequence[str], f: Mapping[str, Any]) -> str:
    """The script's head: usage, strict mode, trtexec found (else exit 2 before any work), the output folders."""
    dirs = _shell(sorted({f["engine_dir"], f["results_dir"]}))
    return (
        "#!/usr/bin/env bash\n"
        f"# Generated by bottlefit for {profile.describe()}; re-export instead of editing.\n"
        f"# Usage: ./build_engine.sh [route ...]   routes: {' '.join(routes)} (default: {' '.join(defaults)})\n"
        "# Builds each engine with trtexec, runs it once on the golden inputs and checks the outputs.\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f"TRTEXEC=${{TRTEXEC:-{TRTEXEC_DEFAULT}}}\n"
        "PYTHON=${PYTHON:-python3}\n"
        'if [ ! -x "$TRTEXEC" ]; then\n'
        '  echo "trtexec not found at $TRTEXEC (set TRTEXEC=/path/to/trtexec)" >&2\n'
        "  exit 2\n"
        "fi\n"
        f"mkdir -p {dirs}\n\n"
    )


def _script_dispatch(routes: Sequence[str], defaults: Sequence[str]) -> str:
    """The script's tail: run each route asked for (default: ``defaults``), an unknown one exits 2, a failed one
    makes the exit status 1 after the others ran."""
    return (
        f"if [ $# -eq 0 ]; then set -- {' '.join(defaults)}; fi\n"
        "status=0\n"
        'for route in "$@"; do\n'
        '  case "$route" in\n'
        f"    {'|'.join(routes)}) ;;\n"
        f"    *) echo \"unknown route '$route'; choose from: {' '.join(routes)}\" >&2; exit 2 ;;\n"
        "  esac\n"
        '  if "route_$route"; then\n'
        '    echo "== $route: PASS"\n'
        "  else\n"
        '    echo "== $route: FAIL (exit $?)"\n'
        "    status=1\n"
        "  fi\n"
        "done\n"
        'exit "$status"\n'
    )
