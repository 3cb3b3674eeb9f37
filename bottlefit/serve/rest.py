"""The Open Inference Protocol (KServe v2) over HTTP/REST, with Triton's binary tensor extension, on Starlette."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bottlefit.serve.boardhttp import HEADER as HEADER_LEN  # the binary extension's header: one source
from bottlefit.serve.model import (
    DTYPES,
    REQUEST_TENSOR_PARAMS,
    InferError,
    ServedModel,
    TensorIn,
    bad,
    join_bytes_elements,
    server_metadata,
)

log = logging.getLogger("bottlefit.serve")
Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _model(app_model: ServedModel, request: Request) -> ServedModel:
    name = request.path_params["name"]
    version = request.path_params.get("version")
    if name != app_model.name or (version is not None and version != app_model.version):
        v = f" version {version}" if version is not None else ""
        raise InferError(404, f"unknown model {name!r}{v}; this server serves {app_model.name!r} version "
                              f"{app_model.version}")
    return app_model


async def _body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InferError(413, f"request of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InferError(413, f"request exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_infer_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], list[TensorIn]]:
    """The JSON request header and its inputs, binary sections cut out as ``binary_data_size`` says."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise bad(f"{HEADER_LEN} {header_length!r} is not an integer") from None
        if not 0 < n <= len(body):
            raise bad(f"{HEADER_LEN} {n} is outside the body's {len(body)} bytes")
    else:
        n = len(body)
    try:
        req = json.loads(body[:n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"request header is not valid JSON ({e})") from None
    except RecursionError:
        raise bad("request header nests JSON too deeply") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise bad("request JSON needs an 'inputs' list")
    shared = req.get("parameters")
    shared = {} if shared is None else shared
    if not isinstance(shared, dict):
        raise bad(f"request parameters must be an object, not {type(shared).__name__}")
    pos, inputs = n, []
    for i, t in enumerate(req["inputs"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("shape"), list):
            raise bad(f"input {i} needs a name, a datatype and a shape")
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise bad(f"input {t['name']!r}: parameters must be an object")
        data: Any
        if "binary_data_size" in params:
            size = params.pop("binary_data_size")
            if not isinstance(size, int) or size < 0:
                raise bad(f"input {t['name']!r}: binary_data_size {size!r} is not a byte count")
            if pos + size > len(body):
                raise bad(f"input {t['name']!r}: binary data truncated ({len(body) - pos} of {size} bytes present)")
            data = body[pos : pos + size]
            pos += size
        elif "data" in t:
            data = t["data"]
            if t.get("datatype") == "BYTES":
                raise bad(f"input {t['name']!r}: BYTES frames go in the binary extension (binary_data_size)")
            if isinstance(data, list):
                data = _json_array(data, t["name"])
        else:
            raise bad(f"input {t['name']!r} has neither data nor binary_data_size")
        params = {**{k: v for k, v in shared.items() if k in REQUEST_TENSOR_PARAMS}, **params}
        inputs.append(TensorIn(t["name"], str(t.get("datatype")), list(t["shape"]), params, data))
    if pos != len(body):
        raise bad(f"{len(body) - pos} bytes of binary data beyond what the inputs' binary_data_size declare")
    return req, inputs


def _json_array(data: list[Any], name: str) -> np.ndarray:
    try:
        arr = np.asarray(data)
    except ValueError:
        raise bad(f"input {name!r}: data is a ragged list") from None
    if arr.dtype == object:
        raise bad(f"input {name!r}: data holds non-numbers")
    return arr.ravel()


def _outputs_wanted(model: ServedModel, req: dict[str, Any]) -> bool:
    """Whether logits go back binary; raises for an unknown output name."""
    binary = bool((req.get("parameters") or {}).get("binary_data_output", False))  # an object: parse_infer_body
    outs = req.get("outputs")
    if outs is None:
        return binary
    if not isinstance(outs, list):
        raise bad("'outputs' must be a list")
    for i, o in enumerate(outs):
        if not isinstance(o, dict) or o.get("name") != model.output_name:
            raise bad(f"unknown output {o.get('name') if isinstance(o, dict) else o!r}; the model has "
                      f"{model.output_name!r}")
        params = o.get("parameters")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise bad(f"outputs[{i}].parameters must be an object, not {type(params).__name__}")
        binary = bool(params.get("binary_data", binary))
    return binary


def build_app(model: ServedModel, max_request_bytes: int = 16 << 20, timeout_s: float = 30.0,
              token: str | None = None) -> Starlette:
    """The protocol's routes. ``token``: every route but the health ones (server live/ready, model ready) needs
    ``Authorization: Bearer <token>`` (else 401)."""
    ready = {"ok": True}
    h = _Handlers(model, ready, max_request_bytes, timeout_s)
    expected = f"Bearer {token}".encode() if token else None

    def guarded(fn: Handler, open_: bool = False) -> Handler:
        return _guarded(fn, None if open_ else expected)

    routes = [
        Route("/v2", guarded(h.meta)),
        Route("/v2/health/live", guarded(h.live, open_=True)),
        Route("/v2/health/ready", guarded(h.server_ready, open_=True)),
        Route("/v2/models/stats", guarded(h.stats)),
        Route("/v2/models/{name}", guarded(h.model_meta)),
        Route("/v2/models/{name}/versions/{version}", guarded(h.model_meta)),
        Route("/v2/models/{name}/ready", guarded(h.model_ready, open_=True)),
        Route("/v2/models/{name}/versions/{version}/ready", guarded(h.model_ready, open_=True)),
        Route("/v2/models/{name}/stats", guarded(h.stats)),
        Route("/v2/models/{name}/versions/{version}/stats", guarded(h.stats)),
        Route("/v2/models/{name}/infer", guarded(h.infer), methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", guarded(h.infer), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_found})
    app.state.ready = ready
    return app


class _Handlers:
    """One handler per route of the protocol, for the one model served."""

    def __init__(self, model: ServedModel, ready: dict[str, bool], max_request_bytes: int, timeout_s: float) -> None:
        self.model, self.ready = model, ready
        self.max_request_bytes, self.timeout_s = max_request_bytes, timeout_s

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def server_ready(self, request: Request) -> Response:
        ok = self.ready["ok"] and self.model.ready
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def meta(self, request: Request) -> Response:
        return JSONResponse(server_metadata())

    async def model_meta(self, request: Request) -> Response:
        m = _model(self.model, request)
        return JSONResponse({**m.metadata(), "parameters": {"contracts": m.contracts_info()}})

    async def model_ready(self, request: Request) -> Response:
        _model(self.model, request)
        return JSONResponse({"name": self.model.name, "ready": self.model.ready})

    async def stats(self, request: Request) -> Response:
        if "name" in request.path_params:
            _model(self.model, request)
        return JSONResponse({"model_stats": [self.model.stats.to_dict(self.model.name, self.model.version)]})

    async def infer(self, request: Request) -> Response:
        m = _model(self.model, request)
        t0 = time.perf_counter()
        body = await _body(request, self.max_request_bytes)
        req, inputs = await run_in_threadpool(parse_infer_body, body, request.headers.get(HEADER_LEN))
        binary = _outputs_wanted(m, req)
        fut = await run_in_threadpool(m.infer, inputs)
        try:
            y = await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout_s)
        except TimeoutError:
            raise InferError(503, f"no result within {self.timeout_s} s") from None
        return _infer_response(m, req, y, binary, round((time.perf_counter() - t0) * 1e3, 3))


def _infer_response(m: ServedModel, req: dict[str, Any], y: np.ndarray, binary: bool, server_ms: float) -> Response:
    """The logits as the protocol's response: JSON data, or the binary extension (JSON header + raw FP32)."""
    y = np.ascontiguousarray(y, dtype=DTYPES["FP32"])
    out: dict[str, Any] = {"name": m.output_name, "datatype": "FP32", "shape": list(y.shape)}
    resp: dict[str, Any] = {"model_name": m.name, "model_version": m.version, "outputs": [out],
                            "parameters": {"server_ms": server_ms}}
    if "id" in req:
        resp["id"] = req["id"]
    if not binary:
        out["data"] = y.ravel().tolist()
        return JSONResponse(resp)
    blob = y.tobytes()
    out["parameters"] = {"binary_data_size": len(blob)}
    header = json.dumps(resp).encode()
    return Response(header + blob, media_type="application/octet-stream", headers={HEADER_LEN: str(len(header))})


def _guarded(fn: Handler, expected: bytes | None) -> Handler:
    """``fn`` behind the bearer token ``expected`` (None: open), its errors as the protocol's error JSON."""

    async def handler(request: Request) -> Response:
        if expected is not None:
            got = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                return JSONResponse({"error": "missing or wrong bearer token (header Authorization: Bearer "
                                              "<token>)"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        try:
            return await fn(request)
        except InferError as e:
            return _error(e.status, str(e))
        except ClientDisconnect:  # the client went away mid-request: nobody to answer, nothing to log
            return Response(status_code=499)
        except Exception as e:  # a bug of ours: the protocol's error JSON, the traceback once in the log
            log.exception("%s %s failed", request.method, request.url.path)
            return _error(500, f"internal error: {type(e).__name__}")

    return handler


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(getattr(exc, "status_code", 404), f"no route {request.method} {request.url.path}")


__all__ = ["build_app", "parse_infer_body", "join_bytes_elements", "HEADER_LEN"]
