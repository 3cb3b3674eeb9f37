"""Checkpoint I/O. Every file is untrusted: nothing but tensors and plain containers is ever unpickled.

Formats read (docs/checkpoints.md):
- ours: ``{"format": "bottlefit", "format_version": 1, "card": {...}, "model": state_dict, ...}``;
- the authors' torchdistill dict: ``model, optimizer, best_value, lr_scheduler, config, args`` (``args`` is an
  ``argparse.Namespace``; ``config["models"]["student_model"]`` names the architecture);
- sc2bench's: ``model`` keyed ``bottleneck_layer.*``, no ``config``;
- a bare state_dict.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bottlefit.errors import UserError
from bottlefit.files import atomic_write_bytes, sha256_file  # noqa: F401  (sha256_file: its old home)
from bottlefit.models import registry
from bottlefit.models.card import ModelCard

FORMAT = "bottlefit"
FORMAT_VERSION = 1

# The only non-container class these formats need. Counter (lr_scheduler milestones) is already allowed by
# torch's weights-only unpickler.
_SAFE_GLOBALS = [argparse.Namespace]


@dataclass
class LoadedModel:
    model: nn.Module
    card: ModelCard
    source: str  # "bottlefit" | "torchdistill" | "sc2bench" | "state_dict" | "untrained"
    path: Path | None
    sha256: str | None
    meta: dict[str, Any] = field(default_factory=dict)  # best_value, epoch … when the file has them


def read_untrusted(path: Path) -> Any:
    """``torch.load`` with nothing but tensors, plain data and the allow-list; one-line UserErrors."""
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint file; check the path")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a checkpoint file")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        if found:
            raise UserError(
                f"{path}: refused: loading it would unpickle {found.group(1)}, which is neither a tensor nor plain "
                "data; re-save only its state_dict from a trusted environment"
            ) from None
        raise UserError(f"{path}: not a readable PyTorch checkpoint (the file is not a torch.save pickle); "
                        "is it the right file and complete?") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any parser failure (IndexError, struct.error, ...) is
        # the file's fault, never a traceback
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({_unreadable_reason(path, e)}); copy or "
                        "download it again and compare its checksum, or re-save it with "
                        "torch.save(model.state_dict(), PATH)") from None


def _unreadable_reason(path: Path, e: Exception) -> str:
    """What broke, in the user's terms: the unpickler's own words (``pop from empty list``, an EOFError without
    a message) describe our parser's state, not the file."""
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(e, IndexError | KeyError | EOFError | struct.error | TypeError | AttributeError | ValueError):
        return "its pickled data is malformed or cut short: the file is damaged, truncated or not made by torch.save"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:160]


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _infer_from_keys(sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]] | None:
    """Architecture and parameters from the state_dict itself (sc2bench and bare files say nothing else)."""
    if "features.bottleneck.encoder.6.weight" in sd:
        bc = sd["features.bottleneck.encoder.6.weight"].shape[0]
        n3 = len({k.split(".")[2] for k in sd if k.startswith("features.denseblock3.")})
        arch = {32: "custom_densenet169", 48: "custom_densenet201"}.get(n3)
        return (arch, {"bottleneck_channel": int(bc)}) if arch else None
    if "bottleneck.encoder.0.weight" in sd and "layer3.0.conv1.weight" in sd:
        if "bottleneck.encoder.9.weight" in sd:
            return "custom_resnet152", {"bottleneck_channel": int(sd["bottleneck.encoder.9.weight"].shape[0]),
                                        "bottleneck_ver": "3"}
        if "bottleneck.encoder.6.weight" in sd:
            return "custom_resnet152", {"bottleneck_channel": int(sd["bottleneck.encoder.6.weight"].shape[0]),
                                        "bottleneck_ver": "2"}
        return "custom_resnet152", {"bottleneck_channel": int(sd["bottleneck.encoder.0.weight"].shape[0]),
                                    "bottleneck_ver": "1"}
    return None


def _sc2bench_rename(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # sc2bench keeps the bottleneck as a sibling named bottleneck_layer; its DenseNet `features` lacks it.
    dense = any(k.startswith("features.denseblock3.") for k in sd)
    prefix = "features.bottleneck." if dense else "bottleneck."
    old = "bottleneck_layer."
    return {(prefix + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}


def key_mismatch(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``sd`` from loading strictly into a module with state_dict ``expected``, or None."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shaped = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    if shaped:
        parts.append(f"{len(shaped)} mis-shaped (first: {'; '.join(shaped[:2])})")
    return "; ".join(parts) if parts else None


def _check_keys(path: Path, model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    problem = key_mismatch(model.state_dict(), sd)
    if problem:
        raise UserError(f"{path}: weights do not fit {what}: {problem}; check --arch and its parameters")
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{path}: tensor {k!r} holds NaN or Inf values; the checkpoint is corrupt or diverged")


def check_format_version(path: Path, version: Any) -> None:
    """Our checkpoints say which layout they use; a newer one may mean something this reader would misread."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path}: format_version {version!r} is not a bottlefit checkpoint version (1..."
                        f"{FORMAT_VERSION}); the file is damaged or not ours")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format_version {version} is newer than this bottlefit reads (up to "
                        f"{FORMAT_VERSION}); upgrade bottlefit")


def load(
    path: str | os.PathLike[str],
    arch: str | None = None,
    params: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load any supported checkpoint into a BottleFit model (eval mode) with its card.

    ``arch``/``params`` are what the user asked for: they decide when the file says nothing, and must agree
    with what the file says otherwise.
    """
    path = Path(path)
    f = _read_checkpoint(path)
    name, merged = _resolve(path, f, arch, params)
    # a file of ours keeps the provenance its card states: random weights saved to a file are still untrained,
    # and parity judges them by the untrained gates
    model, card = registry.build(name, merged, weights="untrained" if f.untrained else "checkpoint")
    _check_keys(path, model, f.state_dict, f"{name} {merged}")
    model.load_state_dict(f.state_dict, strict=True)
    model.eval()
    return LoadedModel(model, card, f.source, path, sha256_file(path), f.meta)


@dataclass
class _CheckpointFile:
    """What a checkpoint file says, whichever of the formats it is in."""

    source: str  # "bottlefit" | "torchdistill" | "sc2bench" | "state_dict"
    state_dict: dict[str, torch.Tensor]  # renamed to BottleFit's module names (sc2bench's bottleneck_layer.)
    arch: str | None = None  # None: the file does not say
    params: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # best_value, epoch … when the file has them
    untrained: bool = False  # a file of ours whose card says its weights are random


def _read_checkpoint(path: Path) -> _CheckpointFile:
    """The file's format, weights, architecture and parameters (when it states them) and training record."""
    obj = read_untrusted(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        check_format_version(path, obj.get("format_version"))
        card = ModelCard.from_dict(obj["card"])
        return _CheckpointFile("bottlefit", obj["model"], card.arch, dict(card.params),
                               {k: obj[k] for k in ("best_value", "epoch", "history") if k in obj},
                               untrained=card.weights == "untrained")
    if isinstance(obj, dict) and "model" in obj and _is_state_dict(obj["model"]):
        sd = obj["model"]
        f = (_CheckpointFile("sc2bench", _sc2bench_rename(sd)) if any(k.startswith("bottleneck_layer.") for k in sd)
             else _CheckpointFile("torchdistill", sd))
        cfg = obj.get("config")
        if isinstance(cfg, dict):
            student = (cfg.get("models") or {}).get("student_model") or {}
            f.arch = student.get("name")
            f.params = dict(student.get("params") or {})
        if "best_value" in obj:
            f.meta["best_value"] = float(obj["best_value"])
        return f
    if _is_state_dict(obj):
        return _CheckpointFile("state_dict", obj)
    raise UserError(f"{path}: not a BottleFit checkpoint: expected a state_dict or a dict with a 'model' entry")


def _resolve(path: Path, f: _CheckpointFile, arch: str | None,
             params: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """(architecture, parameters) to build: the file's (stated, else inferred from its keys), which what the user
    asked for must agree with, and fills in where the file is silent."""
    file_arch, file_params = f.arch, f.params
    if file_arch is None:
        inferred = _infer_from_keys(f.state_dict)
        if inferred is not None:
            file_arch, file_params = inferred
    if file_arch is None and arch is None:
        raise UserError(f"{path}: the checkpoint does not say its architecture; pass --arch "
                        f"({', '.join(registry.names())})")
    if arch is not None and file_arch is not None and arch != file_arch:
        raise UserError(f"{path}: holds a {file_arch} checkpoint, but --arch {arch} was asked for")
    name = file_arch or arch
    assert name is not None
    spec = registry.get(name)
    merged = registry.normalize_params(spec, file_params)
    if params:
        asked = registry.normalize_params(spec, {**file_params, **params})
        diff = [k for k in params if file_arch is not None and k in file_params and asked[k] != merged[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{path}: checkpoint has {k}={merged[k]!r}, but {k}={asked[k]!r} was asked for")
        merged = asked
    return name, merged


def untrained(arch: str, params: dict[str, Any] | None = None, seed: int = 0) -> LoadedModel:
    """A model from its architecture alone, seeded: for demos and tests. Its card says it is untrained."""
    torch.manual_seed(seed)
    model, card = registry.build(arch, params or {}, weights="untrained")
    _settle_batchnorm(model, card, seed)
    return LoadedModel(model, card, "untrained", None, None, {"seed": seed})


@torch.no_grad()
def _settle_batchnorm(model: nn.Module, card: ModelCard, seed: int, batch: int = 4) -> None:
    """Give an untrained model the BN statistics of its own activations (on seeded noise).

    With PyTorch's default running stats (mean 0, var 1) a deep random ResNet's logits reach ~1e5; after one
    pass they are O(1), like a trained model's, so tolerances and quantization ranges mean something.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    gen = torch.Generator().manual_seed(seed)
    model.train()
    model(torch.randn(batch, *card.input_shape, generator=gen))
    model.eval()
    for m in bns:
        m.momentum = 0.1
        m.num_batches_tracked.zero_()


def save(path: str | os.PathLike[str], model: nn.Module, card: ModelCard, **extra: Any) -> Path:
    """Write our format atomically: tensors and plain data only, so ``weights_only=True`` reads it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "card": card.to_dict(),
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **extra}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
