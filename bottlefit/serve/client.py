"""The device side: run the head artifact in its runtime, code the bottleneck, send it over the Open Inference
Protocol (REST, binary tensor extension), get the logits. Standard library transport; works with ``bottlefit
serve`` (every wire) and with the Triton repository of ``bottlefit triton`` (the coded wires; ``--wire fp32`` to
its ``<arch>_tail_fp32``)."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Runtime
from bottlefit.serve import codecs
from bottlefit.serve.boardhttp import HEADER as HEADER_LEN  # the binary extension's header: one source
from bottlefit.serve.boardhttp import (
    V2_TYPES,
    topk,  # one softmax top-k for the host's client and the boards'
)
from bottlefit.serve.contract import TargetExport, WireContract, find_targets, tail_model_name
from bottlefit.serve.head import HeadCodes, load_tables

WIRES = ("fp32", "int8", *codecs.CODECS)


# Why an image failed, and so whose problem it is (bottlefit.errors' exit codes): the image itself or a request the
# server refused (4xx: another export, a wrong --model-name) is the user's (2); a server that cannot be reached,
# times out or fails (5xx, 429) is the environment's (3). run-head verifies nothing, so it never exits 1.
CAUSE_INPUT, CAUSE_REFUSED, CAUSE_UNREACHABLE = "input", "refused", "unreachable"


class RequestFailed(Exception):
    def __init__(self, message: str, retryable: bool, cause: str = CAUSE_UNREACHABLE) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.cause = cause


def check_images(paths: list[str]) -> None:
    """Every image exists as a file before anything is sent (UserError naming the first missing one)."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{missing[0]}: no such image file{more}; check the path")


def board_default_head(target: TargetExport) -> str | None:
    """The head a board bundle's own scripts run by default: the board profile's choice that ``board/golden.json``
    records (an rpi/ bundle; ``board/run_head.py`` and ``client.py`` read the same field), else None."""
    try:
        golden = json.loads((target.path / "board" / "golden.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    profile = golden.get("profile") if isinstance(golden, dict) else None
    model = profile.get("model") if isinstance(profile, dict) else None
    return str(model) if model else None


def pick_head(out: Path, head: str | None = None) -> tuple[TargetExport, WireContract]:
    """The head to run: ``head`` by file name; else the head a board bundle runs by default (an rpi/ bundle's
    board profile: host and board send the same codes); else the first int8 head (TFLite before ONNX), else a
    float one."""
    targets = find_targets(out)
    contracts = [(t, c) for t in targets for c in t.contracts]
    if head is not None:
        for t, c in contracts:
            if c.head == head:
                return t, c
        raise UserError(f"{out}: no head {head!r}; heads: {', '.join(c.head for _, c in contracts)}")
    for t in targets:
        board = board_default_head(t)
        chosen = next(((t, c) for tt, c in contracts if tt is t and c.head == board), None)
        if chosen is not None:
            return chosen
    order = sorted(contracts, key=lambda tc: (not tc[1].quantized, tc[1].runtime != Runtime.LITERT))
    if not order:
        raise UserError(f"{out}: no head artifact in the manifest")
    return order[0]


def build_request(contract: WireContract, codes: np.ndarray, wire: str, input_name: str,
                  tables: codecs.CodecTables | None) -> tuple[bytes, int, int]:
    """(body, header length, coded bytes) for one image (batch 1)."""
    if wire == "fp32":
        blob = contract.dequantize(codes[None]).astype("<f4").tobytes() if contract.quantized \
            else np.ascontiguousarray(codes[None], dtype="<f4").tobytes()
        shape, dtype, params = [1, *contract.nchw_shape], V2_TYPES["float32"], {}
    elif wire == "int8":
        if not contract.quantized:
            raise UserError(f"head {contract.head} emits floats: use --wire fp32")
        blob = np.ascontiguousarray(codes).tobytes()
        shape, dtype = [1, *contract.shape], V2_TYPES[contract.dtype]
        params = {"scale": contract.scale, "zero_point": contract.zero_point, "layout": contract.layout,
                  "contract_id": contract.contract_id}
    else:
        frame = codecs.encode_frame(contract, codes, wire, tables)
        blob = len(frame).to_bytes(4, "little") + frame
        shape, dtype, params = [1], "BYTES", {"codec": wire}
        params["contract_id"] = contract.contract_id
    header = {"inputs": [{"name": input_name, "shape": shape, "datatype": dtype,
                          "parameters": {**params, "binary_data_size": len(blob)}}],
              "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}
    hb = json.dumps(header).encode()
    coded = len(blob) - (4 if dtype == "BYTES" else 0)
    return hb + blob, len(hb), coded


def tls_context(ca_file: str | Path | None) -> ssl.SSLContext | None:
    """The context that trusts ``ca_file`` (a server's self-signed certificate or its CA), else None: https URLs
    then use the system's trust store."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"--ca-file {ca_file}: not a readable PEM certificate ({e})") from None


def post(url: str, body: bytes, header_len: int, timeout_s: float, context: ssl.SSLContext | None = None,
         token: str | None = None) -> tuple[dict[str, Any], bytes]:
    headers = {HEADER_LEN: str(header_len), "Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=context) as r:
            data = r.read()
            n = r.headers.get(HEADER_LEN)
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", "")
        except (ValueError, AttributeError):
            msg = ""
        busy = e.code >= 500 or e.code == 429
        raise RequestFailed(f"HTTP {e.code}: {msg or e.reason}", retryable=busy,
                            cause=CAUSE_UNREACHABLE if busy else CAUSE_REFUSED) from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tls = getattr(e, "reason", e)
        if isinstance(tls, ssl.SSLCertVerificationError):  # a certificate this side does not trust: final
            raise RequestFailed(f"TLS with {url} failed: {tls.verify_message or tls} (pass the server's certificate "
                                "or its CA with --ca-file)", retryable=False) from None
        raise RequestFailed(f"cannot reach {url}: {getattr(e, 'reason', e)}", retryable=True) from None
    hl = int(n) if n is not None else len(data)
    return json.loads(data[:hl]), data[hl:]


def logits_of(resp: dict[str, Any], binary: bytes) -> np.ndarray:
    out = resp["outputs"][0]
    if "data" in out:
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    return np.frombuffer(binary[: out["parameters"]["binary_data_size"]], dtype="<f4").reshape(out["shape"])


@dataclass
class ImageResult:
    image: str
    ok: bool
    head_ms: float = 0.0
    coded_bytes: int = 0
    transfer_ms: float = 0.0
    server_ms: float = 0.0
    round_trip_ms: float = 0.0
    attempts: int = 0
    topk: list[tuple[int, float, float]] = field(default_factory=list)  # (class, softmax probability, logit)
    logits: np.ndarray | None = None
    error: str = ""
    cause: str = ""  # CAUSE_* when not ok

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "logits"}
        d["topk"] = [{"class": c, "probability": p, "logit": s} for c, p, s in self.topk]
        return d

    def line(self) -> str:
        if not self.ok:
            tries = f" after {self.attempts} attempt(s)" if self.attempts else ""
            return f"{self.image}: FAILED{tries}: {self.error}"
        top = " ".join(f"{c}:{p:.3f}" for c, p, _ in self.topk)
        return (f"{self.image}: head {self.head_ms:.2f} ms  {self.coded_bytes} B  transfer {self.transfer_ms:.2f} ms"
                f"  server {self.server_ms:.2f} ms  round trip {self.round_trip_ms:.2f} ms  top-k class:probability "
                f"{top}")


class Client:
    def __init__(self, out: Path, server: str, *, model: str | None = None, wire: str = "int8",
                 head: str | None = None, reference: bool = False, retries: int = 3, backoff_s: float = 0.2,
                 timeout_s: float = 10.0, topk: int = 5, ca_file: str | Path | None = None,
                 token: str | None = None) -> None:
        if wire not in WIRES:
            raise UserError(f"--wire {wire!r}: choose one of {', '.join(WIRES)}")
        self.target, self.contract = pick_head(Path(out), head)
        reference = reference and self.contract.runtime in (Runtime.ONNXRUNTIME, Runtime.LITERT)
        opts = {"reference": True} if reference else {}
        self.head = HeadCodes(self.target, self.contract, **opts)
        self.wire, self.retries, self.backoff_s, self.timeout_s, self.k = wire, retries, backoff_s, timeout_s, topk
        self.tables = load_tables(self.target, self.contract) if wire in ("entropy", "context") else None
        self.model = model or tail_model_name(self.target.card)
        self.url = f"{server.rstrip('/')}/v2/models/{self.model}/infer"
        self.input_name = "bottleneck"
        self.tls, self.token = tls_context(ca_file), token

    def run_one(self, name: str, x: np.ndarray) -> ImageResult:
        res = ImageResult(name, ok=False)
        try:
            codes = self.head(x[None])[0]
            res.head_ms = self.head.last_ms
            body, hl, res.coded_bytes = build_request(self.contract, codes, self.wire, self.input_name, self.tables)
        except (UserError, ValueError) as e:
            res.error, res.cause = str(e), CAUSE_INPUT
            return res
        for attempt in range(1, self.retries + 2):
            res.attempts = attempt
            t0 = time.perf_counter()
            try:
                resp, binary = post(self.url, body, hl, self.timeout_s, self.tls, self.token)
            except RequestFailed as e:
                res.error, res.cause = str(e), e.cause
                if not e.retryable or attempt > self.retries:
                    return res
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
                continue
            res.round_trip_ms = (time.perf_counter() - t0) * 1e3
            logits = logits_of(resp, binary)[0]
            srv = (resp.get("parameters") or {}).get("server_ms")
            res.server_ms = float(srv) if srv is not None else 0.0
            res.transfer_ms = max(0.0, res.round_trip_ms - res.server_ms)
            res.topk = topk(logits, self.k)
            res.logits, res.ok, res.error = logits, True, ""
            return res
        return res

    def run(self, images: list[str]) -> Iterator[ImageResult]:
        from bottlefit.calibration.dataset import load_image

        card = self.target.card
        for path in images:
            try:
                x = load_image(path, card)
            except UserError as e:
                yield ImageResult(str(path), ok=False, error=str(e), cause=CAUSE_INPUT)
                continue
            yield self.run_one(str(path), x)
