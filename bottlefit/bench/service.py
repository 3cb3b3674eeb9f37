"""The offloading baseline's server: the whole model behind the Open Inference Protocol (KServe v2 REST with the
binary tensor extension), taking a JPEG of the model's input crop as a BYTES tensor.

``bottlefit serve`` serves tails only; this is the smallest service that serves the whole model the same way, on
the same transport (uvicorn + Starlette) with serve's own request parser and BYTES framing, so the two modes differ
in what they send and where the model runs, not in the protocol stack.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.models.card import ModelCard
from bottlefit.runtimes import get_runner
from bottlefit.serve.model import InferError, bad, split_bytes_elements
from bottlefit.serve.rest import HEADER_LEN, parse_infer_body

INPUT = "image"


def full_model_name(card: ModelCard) -> str:
    from bottlefit.serve.contract import tail_model_name

    return tail_model_name(card).removesuffix("_tail") + "_full"


def decode_jpeg(data: bytes, card: ModelCard) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    h, w = int(card.input_shape[1]), int(card.input_shape[2])
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG":
                raise bad(f"input {INPUT!r}: a {im.format} image, expected JPEG")
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise bad(f"input {INPUT!r}: not a decodable JPEG ({e})") from None
    if rgb.shape[:2] != (h, w):
        raise bad(f"input {INPUT!r}: a {rgb.shape[1]}x{rgb.shape[0]} image; the model takes the {w}x{h} crop")
    return rgb


class FullModel:
    """The whole model (``full.onnx``) in ONNX Runtime, one JPEG per request."""

    def __init__(self, onnx_path: Path, card: ModelCard, threads: int = 1) -> None:
        self.card = card
        self.name = full_model_name(card)
        self.runner = get_runner("onnxruntime", onnx_path, num_threads=threads)
        self.input_name = self.runner.input_names[0]
        self.output_name = self.runner.output_names[0]
        self.lock = threading.Lock()

    def infer(self, body: bytes, header_length: str | None) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        _, inputs = parse_infer_body(body, header_length)
        if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].datatype != "BYTES" or inputs[0].shape != [1]:
            raise bad(f"expected one BYTES input {INPUT!r} of shape [1] (a JPEG)")
        frames = split_bytes_elements(bytes(inputs[0].data or b""), 1) if not isinstance(inputs[0].data, list) \
            else inputs[0].data
        x = self.card.normalize(decode_jpeg(frames[0], self.card)[None])
        with self.lock:
            y = self.runner.infer({self.input_name: x})[self.output_name]
        return np.ascontiguousarray(y, dtype="<f4"), (time.perf_counter() - t0) * 1e3


def build_app(model: FullModel, max_request_bytes: int = 16 << 20) -> Any:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def infer(request: Request) -> Response:
        try:
            if request.path_params["name"] != model.name:
                raise InferError(404, f"unknown model {request.path_params['name']!r}; serving {model.name!r}")
            body = await request.body()
            if len(body) > max_request_bytes:
                raise InferError(413, f"request exceeds the limit of {max_request_bytes} bytes")
            y, ms = await run_in_threadpool(model.infer, body, request.headers.get(HEADER_LEN))
        except InferError as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        blob = y.tobytes()
        header = json.dumps({"model_name": model.name, "model_version": "1", "parameters": {"server_ms": round(ms, 3)},
                             "outputs": [{"name": model.output_name, "datatype": "FP32", "shape": list(y.shape),
                                          "parameters": {"binary_data_size": len(blob)}}]}).encode()
        return Response(header + blob, media_type="application/octet-stream", headers={HEADER_LEN: str(len(header))})

    return Starlette(routes=[Route("/v2/health/ready", ready),
                             Route("/v2/models/{name}/infer", infer, methods=["POST"])])


class FullModelServer:
    """uvicorn in a background thread on ``host`` (port 0: a free one)."""

    def __init__(self, model: FullModel, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(build_app(model), log_level="warning", access_log=False,
                                                     lifespan="off", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]},
                                       name="bottlefit-full", daemon=True)

    def start(self, timeout_s: float = 20.0) -> FullModelServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("full-model server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def request_body(jpeg: bytes) -> tuple[bytes, int]:
    """(body, header length) of one JPEG as a BYTES tensor in the binary extension."""
    from bottlefit.serve.model import join_bytes_elements

    blob = join_bytes_elements([jpeg])
    header = json.dumps({"inputs": [{"name": INPUT, "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return header + blob, len(header)
