"""LiteRT (TFLite) runner: ai-edge-litert's interpreter, or tflite-runtime where only that exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.runtimes import RuntimeUnavailable


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


class LiteRTRunner:
    """Named arrays in, named arrays out. Names are the .tflite tensor names (what the exporter records in the
    TensorSpecs); an input may also be given by its signature name (e.g. ``args_0``)."""

    name = "litert"

    def __init__(self, path: Path, num_threads: int = 1, xnnpack: bool = True, reference: bool = False) -> None:
        mod = interpreter_module()
        kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": int(num_threads)}
        if reference:
            # TFLite's reference kernels: portable integer arithmetic, the same result on every ISA (the
            # optimized and XNNPACK kernels round differently by up to 1 LSB, per CPU)
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_REF
        elif not xnnpack:
            # the default op resolver applies XNNPACK; this one runs the built-in kernels alone
            kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.path = Path(path)
        self.xnnpack = xnnpack and not reference
        self.reference = reference
        self.interpreter = mod.Interpreter(**kwargs)
        self.interpreter.allocate_tensors()
        self._inputs = self.interpreter.get_input_details()
        self._outputs = self.interpreter.get_output_details()
        self.input_names = [str(d["name"]) for d in self._inputs]
        self.output_names = [str(d["name"]) for d in self._outputs]
        # signature name -> tensor name, so callers may use either
        self._alias: dict[str, str] = {}
        by_index = {int(d["index"]): str(d["name"]) for d in self._inputs}
        for key in self.interpreter.get_signature_list():
            details = self.interpreter.get_signature_runner(key).get_input_details()
            for alias, d in details.items():
                if int(d["index"]) in by_index:
                    self._alias[alias] = by_index[int(d["index"])]

    def _input_value(self, inputs: dict[str, np.ndarray], detail: dict[str, Any]) -> np.ndarray:
        name = str(detail["name"])
        value = inputs.get(name)
        if value is None:
            for alias, target in self._alias.items():
                if target == name and alias in inputs:
                    value = inputs[alias]
        if value is None:
            raise KeyError(f"{self.path.name}: missing input {name!r} (have {sorted(inputs)})")
        arr = np.asarray(value)
        want = np.dtype(detail["dtype"])
        if arr.dtype != want:
            raise TypeError(f"{self.path.name}: input {name!r} must be {want.name}, got {arr.dtype.name}")
        if tuple(arr.shape) != tuple(int(s) for s in detail["shape"]):
            raise ValueError(f"{self.path.name}: input {name!r} must have shape {tuple(detail['shape'])}, "
                             f"got {tuple(arr.shape)}")
        return np.ascontiguousarray(arr)

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for d in self._inputs:
            self.interpreter.set_tensor(d["index"], self._input_value(inputs, d))
        self.interpreter.invoke()
        # get_tensor copies: the interpreter reuses its buffers on the next invoke
        return {str(d["name"]): self.interpreter.get_tensor(d["index"]) for d in self._outputs}
