"""TensorRT's native int8 calibration cache (the text file ``trtexec --calib=`` and IInt8Calibrator read).

Format (docs/tensorrt.md): a header line ``TRT-<NV_TENSORRT_VERSION>-<algorithm>``, then one line per
tensor, ``<name>: <hex>``, where hex is the IEEE-754 float32 bit pattern of the scale as a big-endian integer,
lowercase. The dynamic range TensorRT derives is ±127·scale. Names are ONNX tensor names verbatim and may
contain ':' and '/': readers split at the LAST ':'.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bottlefit.errors import UserError
from bottlefit.files import atomic_write_text

_HEADER = re.compile(r"TRT-(\d+)-([A-Za-z0-9_]+)")
_HEX = re.compile(r"[0-9a-fA-F]{1,8}")


def scale_to_hex(scale: float) -> str:
    """Bits of float32(scale), big-endian, lowercase, without leading zeros.

    Every realistic scale (> 2.5e-29) has 8 digits; a zero scale becomes "0", the spelling TensorRT's own
    caches use for tensors it found uniformly zero. trtexec's reader takes up to 8 chars, so both parse.
    """
    (bits,) = struct.unpack(">I", struct.pack(">f", scale))
    return format(bits, "x")


def hex_to_scale(text: str) -> float:
    (value,) = struct.unpack(">f", struct.pack(">I", int(text, 16)))
    return value


def format_cache(trt_version_code: int, scales: Mapping[str, float], algorithm: str = "EntropyCalibration2") -> str:
    if not _HEADER.fullmatch(f"TRT-{int(trt_version_code)}-{algorithm}"):
        raise UserError(f"calibration cache: bad algorithm tag {algorithm!r} (expected e.g. EntropyCalibration2)")
    lines = [f"TRT-{int(trt_version_code)}-{algorithm}"]
    for name, scale in scales.items():
        if not name or "\n" in name or "\r" in name:
            raise UserError(f"calibration cache: tensor name {name!r} cannot be written on one line")
        scale = float(scale)
        # TensorRT uses ±127·scale as the range: negative or non-finite scales mean a broken observer.
        if not math.isfinite(scale) or scale < 0:
            raise UserError(f"calibration cache: scale of tensor {name!r} is {scale}; it must be finite and >= 0")
        lines.append(f"{name}: {scale_to_hex(scale)}")
    return "\n".join(lines) + "\n"


def write_cache(
    path: str | os.PathLike[str],
    trt_version_code: int,
    scales: Mapping[str, float],
    algorithm: str = "EntropyCalibration2",
) -> Path:
    """Write the cache atomically. Lines follow ``scales``' order (pass ONNX topological order)."""
    return atomic_write_text(path, format_cache(trt_version_code, scales, algorithm))


def read_cache(path: str | os.PathLike[str]) -> tuple[int, str, dict[str, float]]:
    """Parse a cache the way trtexec does (split at the last ':', hex from two chars after it), but strictly:

    anything trtexec would silently misread (no ": " separator, non-hex or over-long values, duplicate
    names) is a UserError naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: calibration cache not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: calibration cache is not text ({e})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise UserError(f"{path}: calibration cache is empty")
    header = _HEADER.fullmatch(lines[0].rstrip("\r"))
    if not header:
        raise UserError(f"{path}:1: expected a header like TRT-8502-EntropyCalibration2, got {lines[0][:60]!r}")
    scales: dict[str, float] = {}
    for lineno, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")
        if not line.strip():
            continue  # trtexec skips lines without ':'; a blank line is harmless
        pos = line.rfind(":")
        value = line[pos + 2 :] if pos >= 0 else ""
        if pos <= 0 or line[pos + 1 : pos + 2] != " " or not _HEX.fullmatch(value):
            raise UserError(f"{path}:{lineno}: expected '<tensor name>: <hex scale>', got {line[:80]!r}")
        name = line[:pos]
        if name in scales:
            raise UserError(f"{path}:{lineno}: tensor {name!r} appears twice")
        scales[name] = hex_to_scale(value)
    return int(header.group(1)), header.group(2), scales


def check_cache(
    path: str | os.PathLike[str],
    expected_code: int,
    onnx_sha256: str,
    manifest_binding: Mapping[str, Any],
) -> dict[str, float]:
    """Refuse a stale cache: made for another TensorRT, or bound in the manifest to another ONNX file.

    ``manifest_binding`` is the manifest's record for the cache, e.g. ``{"onnx_sha256": "...",
    "sha256": "..."}``; ``sha256`` (of the cache file itself) is checked when present.
    TensorRT silently skips a cache whose header does not match its version and then calibrates on null
    inputs (docs/tensorrt.md), so a mismatch must stop the build here. Returns the scales.
    """
    path = Path(path)
    code, _algorithm, scales = read_cache(path)
    if code != int(expected_code):
        raise UserError(
            f"{path}: calibration cache is for TensorRT version code {code}, the board runs {expected_code}; "
            "re-export for this profile (the header must match exactly or TensorRT ignores the cache)"
        )
    bound = manifest_binding.get("onnx_sha256")
    if not bound:
        raise UserError(f"{path}: the manifest does not say which ONNX this cache was made for; re-export")
    if bound != onnx_sha256:
        raise UserError(
            f"{path}: stale calibration cache: it was made for ONNX sha256 {bound[:12]}…, the ONNX here is "
            f"{onnx_sha256[:12]}…; re-export so tensor names and ranges match the shipped model"
        )
    own = manifest_binding.get("sha256")
    if own and hashlib.sha256(path.read_bytes()).hexdigest() != own:
        raise UserError(f"{path}: calibration cache was modified after export (sha256 differs from the manifest)")
    return scales
