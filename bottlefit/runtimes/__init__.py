"""One small runner per runtime, behind one contract (:class:`Runner`): named arrays in, named arrays out.

Heavy runtimes are imported only when their runner is asked for, so the rest works without them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from bottlefit.errors import UserError
from bottlefit.runtimes.base import IOSpec, Runner, RuntimeUnavailable

__all__ = ["IOSpec", "Runner", "RuntimeUnavailable", "RUNTIMES", "get_runner"]

_RUNNERS = {
    "onnxruntime": "bottlefit.runtimes.onnxruntime:OnnxRuntimeRunner",
    "litert": "bottlefit.runtimes.litert:open_litert",  # LiteRTRunner, or the reference evaluator
    "tensorrt": "bottlefit.runtimes.tensorrt:TensorRTRunner",
    "ncnn": "bottlefit.runtimes.ncnn:NcnnRunner",
}
RUNTIMES: tuple[str, ...] = tuple(sorted(_RUNNERS))


def get_runner(runtime: str, path: Path, **options: Any) -> Runner:
    """The runner for ``runtime`` with ``path`` loaded; ``options`` are that runner's constructor options.

    Raises UserError for an unknown runtime or a missing file, RuntimeUnavailable where the runtime is not
    installed here."""
    if runtime not in _RUNNERS:
        raise UserError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    mod_name, cls_name = _RUNNERS[runtime].split(":")
    module = importlib.import_module(mod_name)
    runner: Runner = getattr(module, cls_name)(Path(path), **options)
    return runner
