"""The wire contracts of an export's heads, as the tail server and the device client both read them.

A contract is what one head artifact puts on the network per image: the integer codes (or floats), their shape
and layout, the affine map back to floats, and an id that binds them to one model card and one head artifact
(``sha256(card JSON | head sha256)``). A payload made for another export carries another id and is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.errors import UserError
from bottlefit.exporter import wire
from bottlefit.exporter.artifact import Artifact, Precision, Role, Runtime, TensorSpec
from bottlefit.exporter.manifest import MANIFEST, check_hashes, read_manifest, target_dirs
from bottlefit.models.card import ModelCard

_INT_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def tail_model_name(card: ModelCard) -> str:
    """The tail's model name on the protocol (and in a Triton repository): ``<arch>_tail``, in Triton's alphabet."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{card.arch}_tail")


def contract_id(card: ModelCard, head_sha256: str) -> str:
    """12 hex digits binding a payload to one model card (as the manifest writes it) and one head artifact's
    bytes."""
    blob = json.dumps(card.to_dict(), sort_keys=True, separators=(",", ":")).encode() + b"|" + head_sha256.encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class WireContract:
    """One head's wire contract. ``shape`` is one image's, in ``layout`` (C,H,W for NCHW; H,W,C for NHWC)."""

    target: str
    head: str
    runtime: str
    contract_id: str
    dtype: str  # int8 | uint8 | float32
    shape: tuple[int, ...]
    layout: str
    scale: float | None
    zero_point: int | None
    head_outputs_codes: bool  # True: the artifact itself emits the integer codes (TFLite); False: floats (Q/DQ)

    @property
    def quantized(self) -> bool:
        return self.dtype in _INT_RANGE

    @property
    def nchw_shape(self) -> tuple[int, ...]:
        """One image's shape as the tail takes it (C, H, W)."""
        if self.layout == "NHWC" and len(self.shape) == 3:
            h, w, c = self.shape
            return (c, h, w)
        return self.shape

    def spec(self) -> TensorSpec:
        return TensorSpec("bottleneck", (1, *self.shape), self.dtype, self.layout, self.scale, self.zero_point)

    def codes(self, head_output: np.ndarray) -> np.ndarray:
        """What the head artifact emitted for one image (batch 1) -> that image's codes in the wire layout."""
        y = np.asarray(head_output)
        if not self.quantized:
            return np.ascontiguousarray(y.reshape(self.shape).astype(np.float32))
        if not self.head_outputs_codes:  # a Q/DQ graph: floats that are exactly scale * (q - zp); recover q
            lo, hi = _INT_RANGE[self.dtype]
            q = np.round(y.astype(np.float32) / np.float32(self.scale)) + self.zero_point
            y = np.clip(q, lo, hi).astype(self.dtype)
        return np.ascontiguousarray(y.reshape(self.shape).astype(self.dtype))

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """Codes (batch, *shape) -> the float32 NCHW batch the tail takes, with exactly the recorded affine."""
        return wire.decode(self.spec(), codes)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "head": self.head, "runtime": self.runtime, "contract_id": self.contract_id,
                "dtype": self.dtype, "shape": list(self.shape), "layout": self.layout, "scale": self.scale,
                "zero_point": self.zero_point}


def head_contract(target: str, card: ModelCard, art: Artifact) -> WireContract | None:
    """The contract of one head artifact; None for heads whose wire is not a static tensor (bq8 per image)."""
    if card.bottleneck.quantizer == "bq8" or not art.outputs:
        return None
    out = art.outputs[0]
    cid = contract_id(card, art.sha256)
    shape = tuple(int(d) for d in out.shape[1:])
    if out.dtype in _INT_RANGE:
        return WireContract(target, art.file, art.runtime, cid, out.dtype, shape, out.layout or "NCHW",
                            float(out.scale) if out.scale is not None else None,
                            int(out.zero_point) if out.zero_point is not None else None, True)
    rec = art.quantization.get("output") if art.precision == Precision.INT8 else None
    if isinstance(rec, dict) and rec.get("dtype") in _INT_RANGE and rec.get("scale"):
        return WireContract(target, art.file, art.runtime, cid, str(rec["dtype"]), shape, out.layout or "NCHW",
                            float(rec["scale"]), int(rec.get("zero_point", 0)), False)
    return WireContract(target, art.file, art.runtime, cid, "float32", shape, out.layout or "NCHW", None, None,
                        False)


@dataclass
class TargetExport:
    """One OUT/<target>/ directory: its manifest, artifacts and the contracts of its heads."""

    path: Path
    manifest: dict[str, Any]
    card: ModelCard  # the manifest's model_card, read once
    artifacts: list[Artifact]
    contracts: list[WireContract]

    def artifact(self, file: str) -> Artifact:
        for a in self.artifacts:
            if a.file == file:
                return a
        raise UserError(f"{self.path}: no artifact {file!r} in {MANIFEST}")

    def tail(self) -> Artifact | None:
        return next((a for a in self.artifacts if a.role == Role.TAIL and a.runtime == Runtime.ONNXRUNTIME), None)


def load_target(path: Path) -> TargetExport:
    """OUT/<target>/ with its artifacts' hashes checked against the manifest."""
    manifest = read_manifest(path)
    arts = check_hashes(path, manifest)
    card = ModelCard.from_dict(manifest["model_card"])
    contracts = [c for a in arts if a.role == Role.HEAD if (c := head_contract(path.name, card, a)) is not None]
    return TargetExport(path, manifest, card, arts, contracts)


def find_targets(out: Path) -> list[TargetExport]:
    """OUT itself (one target dir) or every OUT/<target>/ holding a manifest (hidden directories skipped)."""
    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: no such directory; pass the --out root of `bottlefit export` or one target in it")
    dirs = target_dirs(out)
    if not dirs:
        raise UserError(f"{out}: no target directory with a {MANIFEST}; run `bottlefit export --out {out}` first")
    return [load_target(d) for d in dirs]
