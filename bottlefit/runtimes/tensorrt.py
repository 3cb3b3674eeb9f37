"""TensorRT runner over a serialized engine (.engine/.plan), for hosts or boards where TensorRT is installed.

Device memory: torch CUDA tensors serve as the binding buffers (torch is already a dependency of bottlefit,
so no cuda-python/pycuda is needed); the engine runs on a torch CUDA stream.
Supports TensorRT 8.x (binding API, execute_async_v2) and 8.5+/10.x (named-tensor API, execute_async_v3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.errors import UserError
from bottlefit.runtimes.base import IOSpec, Runner, RuntimeUnavailable

UNAVAILABLE = (
    "TensorRT is not installed here: build the engine on the board with build_engine.sh, "
    "or run inside an NVIDIA TensorRT container"
)


def import_tensorrt() -> Any:
    """The tensorrt module, or RuntimeUnavailable (it is imported lazily: most hosts have none)."""
    try:
        import tensorrt
    except ImportError:
        raise RuntimeUnavailable(UNAVAILABLE) from None
    return tensorrt


def _torch_cuda() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailable("TensorRT is installed but no CUDA device is visible to torch")
    return torch


def _torch_dtype(trt: Any, torch: Any, trt_dtype: Any) -> Any:
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "INT8": torch.int8,
        "INT32": torch.int32,
        "BOOL": torch.bool,
        "UINT8": torch.uint8,
        "INT64": torch.int64,
        "BF16": torch.bfloat16,
    }
    for name, dtype in table.items():
        if hasattr(trt.DataType, name) and trt_dtype == getattr(trt.DataType, name):
            return dtype
    raise UserError(f"TensorRT binding type {trt_dtype} has no torch equivalent")


def _numpy_dtype(trt: Any, trt_dtype: Any) -> np.dtype | None:
    """None for types numpy lacks (BF16, FP8, ...): those inputs are not dtype-checked."""
    table = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
             "UINT8": np.uint8, "INT64": np.int64}
    for name, dtype in table.items():
        if hasattr(trt.DataType, name) and trt_dtype == getattr(trt.DataType, name):
            return np.dtype(dtype)
    return None


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, path: Path, device: int = 0, verbose: bool = False) -> None:
        trt = import_tensorrt()
        torch = _torch_cuda()
        super().__init__(path)
        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        blob = self.path.read_bytes()
        with torch.cuda.device(self.device):
            self.runtime = trt.Runtime(self.logger)
            self.engine = self.runtime.deserialize_cuda_engine(blob)
            if self.engine is None:
                raise UserError(
                    f"{self.path}: TensorRT {trt.__version__} could not load this engine; engines are tied to the "
                    "TensorRT version and GPU they were built with: rebuild it here"
                )
            self.context = self.engine.create_execution_context()
        # 10.x removed bindings; 8.5 has both, prefer the tensor API where execute_async_v3 exists.
        self._tensor_api = hasattr(self.engine, "num_io_tensors") and hasattr(self.context, "execute_async_v3")
        self._inputs: dict[str, IOSpec] = {}
        self._outputs: dict[str, IOSpec] = {}
        for name in self._io_names():
            spec = IOSpec(name, self._engine_shape(name), _numpy_dtype(trt, self._dtype(name)))
            (self._inputs if self._is_input(name) else self._outputs)[name] = spec

    def input_specs(self) -> dict[str, IOSpec]:
        return dict(self._inputs)

    def output_specs(self) -> dict[str, IOSpec]:
        return dict(self._outputs)

    # -- the two TensorRT APIs behind small helpers
    def _io_names(self) -> list[str]:
        if self._tensor_api:
            return [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        return [self.engine.get_binding_name(i) for i in range(self.engine.num_bindings)]

    def _is_input(self, name: str) -> bool:
        if self._tensor_api:
            return self.engine.get_tensor_mode(name) == self._trt.TensorIOMode.INPUT
        return bool(self.engine.binding_is_input(self.engine.get_binding_index(name)))

    def _dtype(self, name: str) -> Any:
        if self._tensor_api:
            return self.engine.get_tensor_dtype(name)
        return self.engine.get_binding_dtype(self.engine.get_binding_index(name))

    def _engine_shape(self, name: str) -> tuple[int, ...]:
        """The engine's own shape: -1 for a dimension its optimization profile leaves dynamic."""
        if self._tensor_api:
            return tuple(int(d) for d in self.engine.get_tensor_shape(name))
        return tuple(int(d) for d in self.engine.get_binding_shape(self.engine.get_binding_index(name)))

    def _set_input_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self._tensor_api:
            self.context.set_input_shape(name, shape)
            return tuple(self.context.get_tensor_shape(name))
        index = self.engine.get_binding_index(name)
        self.context.set_binding_shape(index, shape)
        return tuple(self.context.get_binding_shape(index))

    def _output_shape(self, name: str) -> tuple[int, ...]:
        if self._tensor_api:
            return tuple(self.context.get_tensor_shape(name))
        return tuple(self.context.get_binding_shape(self.engine.get_binding_index(name)))

    def infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        buffers: dict[str, Any] = {}
        with torch.cuda.device(self.device):
            for name in self._inputs:
                dtype = _torch_dtype(self._trt, torch, self._dtype(name))
                host = torch.from_numpy(inputs[name])
                buffers[name] = host.to(device=self.device, dtype=dtype).contiguous()
                self._set_input_shape(name, tuple(host.shape))
            for name in self._outputs:
                shape = self._output_shape(name)
                if any(d < 0 for d in shape):
                    raise UserError(f"{self.path}: TensorRT output {name!r} has unresolved shape {shape}")
                dtype = _torch_dtype(self._trt, torch, self._dtype(name))
                buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
            stream = torch.cuda.Stream(device=self.device)
            # The default stream may still be copying inputs: order the engine after it.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            if self._tensor_api:
                for name, buf in buffers.items():
                    self.context.set_tensor_address(name, buf.data_ptr())
                ok = self.context.execute_async_v3(stream.cuda_stream)
            else:
                order = sorted(buffers, key=self.engine.get_binding_index)
                ok = self.context.execute_async_v2([buffers[n].data_ptr() for n in order], stream.cuda_stream)
            stream.synchronize()
        if not ok:
            raise UserError(f"{self.path}: TensorRT reported a failed inference (see the TensorRT log above)")
        return {name: buffers[name].cpu().numpy() for name in self._outputs}
