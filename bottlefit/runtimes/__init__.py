"""One small runner per runtime, behind one contract: named arrays in, named arrays out.

Heavy runtimes are imported only when their runner is asked for, so the rest works without them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bottlefit.errors import UserError

_RUNNERS = {
    "torch": "bottlefit.runtimes.torch_runner:TorchRunner",
    "onnxruntime": "bottlefit.runtimes.onnxruntime:OnnxRuntimeRunner",
    "litert": "bottlefit.runtimes.litert:LiteRTRunner",
    "tensorrt": "bottlefit.runtimes.tensorrt:TensorRTRunner",
}


class Runner(Protocol):
    name: str

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class RuntimeUnavailable(UserError):
    """The runtime's Python package (or its hardware) is not present here."""


def get_runner(runtime: str, path: Path, **options: Any) -> Runner:
    if runtime not in _RUNNERS:
        raise UserError(f"unknown runtime {runtime!r}; known: {', '.join(sorted(_RUNNERS))}")
    mod_name, cls_name = _RUNNERS[runtime].split(":")
    module = importlib.import_module(mod_name)
    return getattr(module, cls_name)(Path(path), **options)
