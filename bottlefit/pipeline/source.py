"""Where the model comes from: a checkpoint file or the built-in untrained architecture. Recorded in every
manifest so that ``bottlefit verify`` can rebuild the same PyTorch reference.

A checkpoint is recorded by what identifies it, its file name, size and sha256, not by where it lay: the same
checkpoint exported from two folders gives the same manifest. Where it lay is a hint kept on this machine only
(``user_cache_dir()/checkpoints/<sha256>``), so that ``verify`` finds it without ``--checkpoint``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from bottlefit.errors import UserError
from bottlefit.files import atomic_write_text, user_cache_dir
from bottlefit.models import checkpoint
from bottlefit.models.checkpoint import LoadedModel
from bottlefit.pipeline.options import DEFAULT_UNTRAINED, ModelSource


def load(source: ModelSource) -> LoadedModel:
    if source.checkpoint is None:
        return checkpoint.untrained(source.arch or DEFAULT_UNTRAINED, source.params(), seed=source.seed)
    return checkpoint.load(source.checkpoint, source.arch, source.params() or None)


def describe(lm: LoadedModel) -> dict[str, Any]:
    if lm.source == "untrained":
        return {"kind": "untrained", "arch": lm.card.arch, "params": lm.card.params, "seed": lm.meta["seed"]}
    assert lm.path is not None
    return {"kind": "checkpoint", "format": lm.source, "name": Path(lm.path).name,
            "size": Path(lm.path).stat().st_size, "sha256": lm.sha256, "arch": lm.card.arch,
            "params": lm.card.params, **lm.meta}


def _hint(sha256: str) -> Path:
    return user_cache_dir() / "checkpoints" / sha256


def remember(lm: LoadedModel) -> None:
    """Note on this machine where the checkpoint with this sha256 lies (a hint for ``verify``; best effort)."""
    if lm.path is None or lm.sha256 is None:
        return
    with contextlib.suppress(OSError):
        _hint(lm.sha256).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_hint(lm.sha256), str(Path(lm.path).resolve()))


def locate(source: dict[str, Any], override: str | Path | None = None) -> Path:
    """The checkpoint a manifest names: ``override`` (--checkpoint), the path manifests before format 2 recorded,
    or where this machine last saw a file with its sha256."""
    if override is not None:
        return Path(override)
    if source.get("path"):
        return Path(source["path"])
    with contextlib.suppress(OSError, KeyError):
        hint = Path(_hint(source["sha256"]).read_text().strip())
        if hint.is_file():
            return hint
    raise UserError(f"{source.get('name', 'the checkpoint')} (sha256 {str(source.get('sha256'))[:12]}…), the "
                    "checkpoint this export was made from, is not known on this machine; pass --checkpoint PATH")


def reload(source: dict[str, Any], override: str | Path | None = None) -> LoadedModel:
    """The same model the manifest was made from; a checkpoint whose bytes changed is refused."""
    if source["kind"] == "untrained":
        return checkpoint.untrained(source["arch"], source["params"], seed=source["seed"])
    path = locate(source, override)
    if not path.is_file():
        raise UserError(f"{path}: the checkpoint this export was made from is not there; pass --checkpoint PATH")
    lm = checkpoint.load(path, source["arch"], source["params"])
    if lm.sha256 != source["sha256"]:
        raise UserError(f"{path}: sha256 differs from the one recorded at export; pass the original checkpoint")
    return lm
