"""Where the model comes from: a checkpoint file or the built-in untrained architecture. Recorded in every
manifest so that ``bottlefit verify`` can rebuild the same PyTorch reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bottlefit.errors import UserError
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
    return {"kind": "checkpoint", "format": lm.source, "path": str(Path(lm.path).resolve()) if lm.path else None,
            "sha256": lm.sha256, "arch": lm.card.arch, "params": lm.card.params, **lm.meta}


def reload(source: dict[str, Any], override: str | Path | None = None) -> LoadedModel:
    """The same model the manifest was made from; a checkpoint whose bytes changed is refused."""
    if source["kind"] == "untrained":
        return checkpoint.untrained(source["arch"], source["params"], seed=source["seed"])
    path = Path(override or source["path"])
    if not path.is_file():
        raise UserError(f"{path}: the checkpoint this export was made from is not there; pass --checkpoint PATH")
    lm = checkpoint.load(path, source["arch"], source["params"])
    if lm.sha256 != source["sha256"]:
        raise UserError(f"{path}: sha256 differs from the one recorded at export; pass the original checkpoint")
    return lm
