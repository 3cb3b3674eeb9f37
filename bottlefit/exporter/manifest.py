"""manifest.json: what was built, from what, with which tools — enough to verify and reproduce it."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Artifact
from bottlefit.files import atomic_write_text, sha256_file
from bottlefit.models.card import ModelCard

MANIFEST = "manifest.json"
# 2: "source" names a checkpoint by file name, size and sha256, no longer by its absolute path
FORMAT_VERSION = 2
# OUT/<target>.failed: the latest attempt that failed parity, kept beside the passing OUT/<target>
FAILED_SUFFIX = ".failed"
_PACKAGES = ("bottlefit", "torch", "torchvision", "onnx", "onnxruntime", "onnxsim", "numpy", "litert-torch",
             "ai-edge-litert", "ncnn")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def write_json(path: Path, data: Any) -> Path:
    """Atomic JSON write with stable key order, so equal content gives equal bytes."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_manifest(out_dir: Path, target: str, card: ModelCard, source: dict[str, Any],
                   artifacts: list[Artifact], **sections: Any) -> dict[str, Any]:
    for a in artifacts:
        a.sha256 = sha256_file(out_dir / a.file)
    manifest = {
        "format": "bottlefit-manifest",
        "format_version": FORMAT_VERSION,
        "target": target,
        "model_card": card.to_dict(),
        "source": source,
        "artifacts": [a.to_dict() for a in artifacts],
        "versions": package_versions(),
        **sections,
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def target_dirs(out: Path) -> list[Path]:
    """The target directories of an export root: ``out`` itself when it holds a manifest, else its subdirectories
    holding one, sorted; never OUT/.<target>.tmp-* (exports in progress or left by dead ones) nor
    OUT/<target>.failed (an attempt that failed parity; name it to use it)."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        return [out]
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if not p.name.startswith(".") and not p.name.endswith(FAILED_SUFFIX)
                  and (p / MANIFEST).is_file())


def read_manifest(target_dir: Path) -> dict[str, Any]:
    path = target_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{target_dir}: no {MANIFEST} here; pass a directory written by `bottlefit export`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); re-run `bottlefit export`") from None
    if data.get("format") != "bottlefit-manifest":
        raise UserError(f"{path}: not a bottlefit manifest")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path}: format_version {version!r} is not a manifest version; re-run `bottlefit export`")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: manifest format_version {version} is newer than this bottlefit reads (up to "
                        f"{FORMAT_VERSION}); upgrade bottlefit")
    return data


def check_hashes(target_dir: Path, manifest: dict[str, Any]) -> list[Artifact]:
    """The artifacts, refusing any whose bytes differ from what the manifest recorded."""
    arts = [Artifact.from_dict(a) for a in manifest["artifacts"]]
    for a in arts:
        p = target_dir / a.file
        if not p.is_file():
            raise UserError(f"{p}: listed in the manifest but missing; re-run `bottlefit export`")
        digest = sha256_file(p)
        if digest != a.sha256:
            raise UserError(f"{p}: sha256 {digest[:12]}… differs from the manifest's {a.sha256[:12]}…: "
                            "the file was changed after export; re-export it")
    return arts
