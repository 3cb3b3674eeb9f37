"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), with the protocol messages that
tritonclient ships (``tritonclient.grpc.service_pb2``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bottlefit.serve.model import REQUEST_TENSOR_PARAMS, InferError, ServedModel, TensorIn, server_metadata

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def _param(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: ServedModel, timeout_s: float = 30.0) -> None:
        self.model, self.timeout_s = model, timeout_s

    def _check(self, name: str, version: str, context: grpc.ServicerContext) -> None:
        if name != self.model.name or version not in ("", self.model.version):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}; this server serves "
                                                     f"{self.model.name!r} version {self.model.version}")

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return service_pb2.ServerReadyResponse(ready=not self.model.batcher.closed)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request.name, request.version, context)
        return service_pb2.ModelReadyResponse(ready=not self.model.batcher.closed)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return json_format.ParseDict(server_metadata(), service_pb2.ServerMetadataResponse())

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request.name, request.version, context)
        return json_format.ParseDict(self.model.metadata(), service_pb2.ModelMetadataResponse())

    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        if request.name:
            self._check(request.name, request.version, context)
        d = {"model_stats": [self.model.stats.to_dict(self.model.name, self.model.version)]}
        return json_format.ParseDict(d, service_pb2.ModelStatisticsResponse(), ignore_unknown_fields=True)

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request.model_name, request.model_version, context)
        m = self.model
        try:
            raw = list(request.raw_input_contents)
            if raw and len(raw) != len(request.inputs):
                raise InferError(400, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
            inputs = []
            for i, t in enumerate(request.inputs):
                params = {k: _param(v) for k, v in request.parameters.items() if k in REQUEST_TENSOR_PARAMS}
                params.update({k: _param(v) for k, v in t.parameters.items()})
                data: Any
                if raw:
                    data = raw[i]
                elif t.datatype == "BYTES":
                    data = list(t.contents.bytes_contents)
                elif t.datatype == "FP32":
                    data = np.asarray(t.contents.fp32_contents, dtype=np.float32)
                else:
                    data = np.asarray(t.contents.int_contents if t.datatype == "INT8" else t.contents.uint_contents)
                inputs.append(TensorIn(t.name, t.datatype, [int(d) for d in t.shape], params, data))
            for o in request.outputs:
                if o.name != m.output_name:
                    raise InferError(400, f"unknown output {o.name!r}; the model has {m.output_name!r}")
            y = m.infer(inputs).result(timeout=self.timeout_s)
        except InferError as e:
            context.abort(_CODES.get(e.status, grpc.StatusCode.INTERNAL), str(e))
        except TimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no result within {self.timeout_s} s")
        y = np.ascontiguousarray(y, dtype="<f4")
        out = service_pb2.ModelInferResponse.InferOutputTensor(name=m.output_name, datatype="FP32",
                                                                 shape=list(y.shape))
        return service_pb2.ModelInferResponse(model_name=m.name, model_version=m.version, id=request.id,
                                              outputs=[out], raw_output_contents=[y.tobytes()])


def start_grpc(model: ServedModel, host: str, port: int, max_message_bytes: int = 16 << 20,
               threads: int = 8) -> tuple[grpc.Server, int]:
    """A started gRPC server and the port it bound (``port`` 0: a free one)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bottlefit-grpc"),
                         options=[("grpc.max_receive_message_length", max_message_bytes),
                                  ("grpc.max_send_message_length", max_message_bytes)],
                         maximum_concurrent_rpcs=threads * 8)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(model), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    server.start()
    return server, bound
