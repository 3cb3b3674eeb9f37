"""LiteRT (TFLite) runner: ai-edge-litert's interpreter, or tflite-runtime where only that exists.

``get_runner("litert", path, reference=True)`` (:func:`open_litert`) gives TFLite's reference semantics evaluated
by :mod:`bottlefit.runtimes.tflite_reference` (the same integers, vectorised) where that covers the graph, and the
reference interpreter itself where it does not; ``LiteRTRunner(path, reference=True)`` is always the interpreter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.runtimes.base import IOSpec, Runner, RuntimeUnavailable


def interpreter_module() -> Any:
    """``ai_edge_litert.interpreter`` (the maintained one), else ``tflite_runtime.interpreter``."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        try:
            from tflite_runtime import interpreter  # type: ignore[no-redef]
        except ImportError as e:
            raise RuntimeUnavailable(
                "no TFLite interpreter installed: pip install 'bottlefit[rpi]' (ai-edge-litert)"
            ) from e
    return interpreter


def _spec(detail: dict[str, Any]) -> IOSpec:
    # "shape" is what the tensors are allocated for (this runner never resizes them): that is what it accepts
    return IOSpec(str(detail["name"]), tuple(int(d) for d in detail["shape"]), np.dtype(detail["dtype"]))


class LiteRTRunner(Runner):
    """Names are the .tflite tensor names (what the exporter records in the TensorSpecs); an input may also be
    given by its signature name (e.g. ``args_0``)."""

    name = "litert"

    def __init__(self, path: Path, num_threads: int = 1, xnnpack: bool = True, reference: bool = False) -> None:
        mod = interpreter_module()
        super().__init__(path)
        kwargs: dict[str, Any] = {"model_path": str(self.path), "num_threads": int(num_threads)}
        if reference:
            # TFLite's reference kernels: portable integer arithmetic, the same result on every ISA (the
            # optimized and XNNPACK kernels round differently by up to 1 LSB, per CPU)
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_REF
        elif not xnnpack:
            # the default op resolver applies XNNPACK; this one runs the built-in kernels alone
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.xnnpack = xnnpack and not reference
        self.reference = reference
        #: what computes the outputs, for the records that say so
        self.evaluator = "TFLite's reference interpreter (BUILTIN_REF)" if reference else \
            f"the TFLite interpreter ({'XNNPACK' if self.xnnpack else 'built-in kernels'})"
        #: why the reference interpreter runs instead of the vectorised evaluator (open_litert); None otherwise
        self.fallback: str | None = None
        self.interpreter = mod.Interpreter(**kwargs)
        self.interpreter.allocate_tensors()
        self._in_details = self.interpreter.get_input_details()
        self._out_details = self.interpreter.get_output_details()
        self._inputs = {s.name: s for s in map(_spec, self._in_details)}
        self._outputs = {s.name: s for s in map(_spec, self._out_details)}
        # signature name -> tensor name, so callers may use either
        self._alias: dict[str, str] = {}
        by_index = {int(d["index"]): str(d["name"]) for d in self._in_details}
        for key in self.interpreter.get_signature_list():
            details = self.interpreter.get_signature_runner(key).get_input_details()
            for alias, d in details.items():
                if int(d["index"]) in by_index:
                    self._alias[alias] = by_index[int(d["index"])]

    def input_specs(self) -> dict[str, IOSpec]:
        return dict(self._inputs)

    def output_specs(self) -> dict[str, IOSpec]:
        return dict(self._outputs)

    def _resolve_alias(self, name: str) -> str:
        return name if name in self._inputs else self._alias.get(name, name)

    def infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for d in self._in_details:
            self.interpreter.set_tensor(d["index"], inputs[str(d["name"])])
        self.interpreter.invoke()
        # get_tensor copies: the interpreter reuses its buffers on the next invoke
        return {str(d["name"]): self.interpreter.get_tensor(d["index"]) for d in self._out_details}


def open_litert(path: Path, num_threads: int = 1, xnnpack: bool = True, reference: bool = False) -> Runner:
    """The runner behind ``get_runner("litert", ...)``. With ``reference``: TFLite's reference semantics from
    :class:`~bottlefit.runtimes.tflite_reference.TFLiteReferenceRunner` where it covers every op of the graph,
    else the reference interpreter, whose ``fallback`` names what was not covered. Otherwise the interpreter with
    its default kernels (XNNPACK unless ``xnnpack=False``)."""
    if not reference:
        return LiteRTRunner(path, num_threads, xnnpack)
    from bottlefit.runtimes.tflite_reference import TFLiteReferenceRunner, Unsupported

    try:
        return TFLiteReferenceRunner(path)
    except Unsupported as e:
        runner = LiteRTRunner(path, num_threads, reference=True)
        runner.fallback = f"bottlefit.runtimes.tflite_reference does not cover it: {e}"
        return runner
