"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), with the protocol messages that
tritonclient ships (``tritonclient.grpc.service_pb2``)."""

from __future__ import annotations

import hmac
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bottlefit.errors import UserError
from bottlefit.serve.model import REQUEST_TENSOR_PARAMS, InferError, ServedModel, TensorIn, server_metadata

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
          413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
# the health RPCs answer without a token (load balancers and probes), as REST's /v2/health/* and model ready do
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
log = logging.getLogger("bottlefit.serve")


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
        return service_pb2.ServerReadyResponse(ready=self.model.ready)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._check(request.name, request.version, context)
        return service_pb2.ModelReadyResponse(ready=self.model.ready)

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
        code, message = grpc.StatusCode.INTERNAL, ""
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
            code, message = _CODES.get(e.status, grpc.StatusCode.INTERNAL), str(e)
        except TimeoutError:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, f"no result within {self.timeout_s} s"
        except Exception as e:  # a bug of ours: INTERNAL with one line, the traceback in the log; the server stays up
            log.exception("ModelInfer failed")
            message = f"internal error: {type(e).__name__}"
        else:
            return self._response(request, y)
        context.abort(code, message)

    def _response(self, request: Any, y: np.ndarray) -> Any:
        m = self.model
        y = np.ascontiguousarray(y, dtype="<f4")
        out = service_pb2.ModelInferResponse.InferOutputTensor(name=m.output_name, datatype="FP32",
                                                                 shape=list(y.shape))
        return service_pb2.ModelInferResponse(model_name=m.name, model_version=m.version, id=request.id,
                                              outputs=[out], raw_output_contents=[y.tobytes()])


class TokenInterceptor(grpc.ServerInterceptor):
    """Every RPC but the health ones needs metadata ``authorization: Bearer <token>`` (else UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata authorization: "
                                                           "Bearer <token>)")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.rsplit("/", 1)[-1] in OPEN_METHODS:
            return continuation(details)
        got = next((v for k, v in details.invocation_metadata if k == "authorization"), "")
        got = got.encode() if isinstance(got, str) else bytes(got)
        return continuation(details) if hmac.compare_digest(got, self.expected) else self._deny


def build_grpc(model: ServedModel, host: str, port: int, *, max_message_bytes: int = 16 << 20,
               max_concurrency: int = 64, tls: tuple[bytes, bytes] | None = None,
               token: str | None = None) -> tuple[grpc.Server, int]:
    """A gRPC server bound (not started) and the port it bound (``port`` 0: a free one). ``max_concurrency``: RPCs
    in flight at once (each holds a thread while its batch runs); more get RESOURCE_EXHAUSTED. ``tls``: (key PEM,
    certificate chain PEM). SO_REUSEPORT is off, so a port another server holds is refused (UserError), never
    shared with it."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="bottlefit-grpc"),
                         interceptors=[TokenInterceptor(token)] if token else None,
                         options=[("grpc.max_receive_message_length", max_message_bytes),
                                  ("grpc.max_send_message_length", max_message_bytes),
                                  ("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=max_concurrency)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(model), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, grpc.ssl_server_credentials([tls])) if tls is not None
                 else server.add_insecure_port(address))
    except RuntimeError:  # grpcio >= 1.5x raises where older ones returned 0
        bound = 0
    if bound == 0:
        server.stop(None)
        raise UserError(f"--grpc-port {port}: cannot bind gRPC to {address}: the port is in use by another process "
                        "(or the address is not this host's); pick another --grpc-port or stop the other server")
    return server, bound
