"""The served tail: inputs of the protocol decoded into the float bottleneck, batched, run in ONNX Runtime.

Transport-free: :mod:`bottlefit.serve.rest` and :mod:`bottlefit.serve.grpc` parse their wire format into
:class:`TensorIn` and map :class:`InferError` to their status codes.
"""

from __future__ import annotations

import queue
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit import __version__
from bottlefit.errors import UserError
from bottlefit.runtimes import get_runner
from bottlefit.serve import codecs
from bottlefit.serve.boardhttp import V2_TYPES
from bottlefit.serve.contract import TargetExport, WireContract, find_targets, tail_model_name
from bottlefit.serve.head import load_tables
from bottlefit.serve.triton import dynamic_batch_onnx

DTYPES = {"FP32": np.dtype("<f4"), "INT8": np.dtype("i1"), "UINT8": np.dtype("u1")}
# request-level parameters that apply to the input tensor (clients such as tritonclient set no per-input ones)
REQUEST_TENSOR_PARAMS = ("scale", "zero_point", "contract_id", "codec", "layout")


class InferError(Exception):
    """A request the protocol answers with an error: ``status`` is the HTTP code (400, 404, 413, 503)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def bad(message: str) -> InferError:
    return InferError(400, message)


def number_param(params: dict[str, Any], key: str) -> float:
    """A request parameter that must be a finite number (JSON and gRPC give ints, floats, strings or bools)."""
    v = params[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise bad(f"parameter {key}={v!r} is not a number")
    try:
        f = float(v)
    except OverflowError:
        f = float("inf")
    if not np.isfinite(f):
        raise bad(f"parameter {key}={v!r} is not finite")
    return f


def int_param(params: dict[str, Any], key: str, lo: int, hi: int) -> int:
    """A request parameter that must be an integer (an integral float too) in lo..hi."""
    f = number_param(params, key)
    if f != round(f) or not lo <= f <= hi:
        raise bad(f"parameter {key}={params[key]!r} is not an integer in {lo}..{hi}")
    return int(f)


@dataclass
class TensorIn:
    """One input tensor of a request. ``data``: raw little-endian bytes (binary extension / raw_input_contents),
    an array (JSON data), or a list of byte strings (BYTES elements)."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] = field(default_factory=dict)
    data: bytes | np.ndarray | list[bytes] | None = None


def split_bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """The protocol's BYTES serialization: each element a u32 little-endian length and its bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise bad("BYTES tensor data truncated inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise bad(f"BYTES element {len(out)} declares {n} bytes, only {len(raw) - pos} remain")
        out.append(raw[pos : pos + n])
        pos += n
    if len(out) != count:
        raise bad(f"BYTES tensor has {len(out)} elements, its shape says {count}")
    return out


def join_bytes_elements(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


class Stats:
    """Per-model statistics in Triton's statistics-extension layout (nanoseconds)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inference_count = self.execution_count = 0
        self.last_inference = 0
        self.d: dict[str, list[int]] = {k: [0, 0] for k in ("success", "fail", "queue", "compute_input",
                                                             "compute_infer", "compute_output")}
        self.batches: dict[int, list[int]] = {}

    def add(self, key: str, ns: int, count: int = 1) -> None:
        with self.lock:
            self.d[key][0] += count
            self.d[key][1] += ns

    def batch(self, size: int, ns: int) -> None:
        with self.lock:
            self.execution_count += 1
            self.inference_count += size
            self.last_inference = int(time.time() * 1e3)
            b = self.batches.setdefault(size, [0, 0])
            b[0] += 1
            b[1] += ns

    def to_dict(self, name: str, version: str) -> dict[str, Any]:
        with self.lock:
            return {
                "name": name, "version": version, "last_inference": self.last_inference,
                "inference_count": self.inference_count, "execution_count": self.execution_count,
                "inference_stats": {k: {"count": c, "ns": ns} for k, (c, ns) in self.d.items()},
                "batch_stats": [{"batch_size": s, "compute_infer": {"count": c, "ns": ns}}
                                for s, (c, ns) in sorted(self.batches.items())],
            }


@dataclass
class _Job:
    x: np.ndarray
    future: Future[np.ndarray]
    t0: int = field(default_factory=time.perf_counter_ns)


class Batcher:
    """A bounded queue feeding a bounded worker pool: requests that arrive within ``max_delay_s`` of the first
    one are run as one batch of at most ``max_batch`` samples. ``submit`` refuses (503) when the queue is full."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], stats: Stats, max_batch: int = 16,
                 max_delay_s: float = 0.002, workers: int = 2, queue_size: int = 64) -> None:
        self.run, self.stats = run, stats
        self.max_batch, self.max_delay_s = max(1, max_batch), max_delay_s
        self.q: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bottlefit-tail")
        self.free = threading.Semaphore(workers)
        self.closed = False
        self._held: _Job | None = None
        self.thread = threading.Thread(target=self._loop, name="bottlefit-batcher", daemon=True)
        self.thread.start()

    def submit(self, x: np.ndarray) -> Future[np.ndarray]:
        fut: Future[np.ndarray] = Future()
        if self.closed:
            raise InferError(503, "server is shutting down")
        try:
            self.q.put_nowait(_Job(x, fut))
        except queue.Full:
            raise InferError(503, f"queue full ({self.q.maxsize} requests waiting); retry later") from None
        return fut

    def _next(self, timeout: float | None) -> _Job | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        return self.q.get(timeout=timeout) if timeout is None or timeout > 0 else self.q.get_nowait()

    def _loop(self) -> None:
        while True:
            job = self._next(None)
            if job is None:
                return
            batch, n = [job], job.x.shape[0]
            deadline = time.perf_counter() + self.max_delay_s
            stop = False
            while n < self.max_batch:
                try:
                    nxt = self._next(deadline - time.perf_counter())
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if n + nxt.x.shape[0] > self.max_batch:
                    self._held = nxt
                    break
                batch.append(nxt)
                n += nxt.x.shape[0]
            self.free.acquire()
            self.pool.submit(self._run_batch, batch)
            if stop:
                return

    def _run_batch(self, batch: list[_Job]) -> None:
        try:
            start = time.perf_counter_ns()
            for j in batch:
                self.stats.add("queue", start - j.t0)
            x = np.concatenate([j.x for j in batch]) if len(batch) > 1 else batch[0].x
            t1 = time.perf_counter_ns()
            y = self.run(x)
            t2 = time.perf_counter_ns()
            self.stats.add("compute_infer", t2 - t1, len(batch))
            self.stats.batch(x.shape[0], t2 - t1)
            pos = 0
            for j in batch:
                k = j.x.shape[0]
                yj = y[pos : pos + k]
                if np.isfinite(yj).all():
                    j.future.set_result(yj)
                else:  # this request's values, not the server: the others in the batch still get theirs
                    j.future.set_exception(InferError(400, "the tail's logits for this input are NaN or infinite: "
                                                           "its values are far outside the bottleneck's range"))
                pos += k
        except Exception as e:  # a runtime failure fails these requests, never the server
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(InferError(500, f"tail failed: {type(e).__name__}: {e}"))
        finally:
            self.free.release()

    def close(self) -> None:
        """Stop accepting; finish what is queued; wait for the workers."""
        if self.closed:
            return
        self.closed = True
        self.q.put(None)
        self.thread.join()
        self.pool.shutdown(wait=True)


class ServedModel:
    """The tail of one export, with the wire contracts of every head found beside it."""

    def __init__(self, out: Path, *, name: str | None = None, max_batch: int = 16, max_delay_ms: float = 2.0,
                 workers: int = 2, queue_size: int = 64, threads: int = 1, allow_failed: bool = False) -> None:
        self.targets: list[TargetExport] = find_targets(Path(out))
        self.warnings: list[str] = []
        for t in self.targets:
            if (why := parity_failure(t)) is None:
                continue
            if not allow_failed:
                raise UserError(f"{t.path}: {why}; re-export (or `bottlefit verify` it), or pass --allow-failed to "
                                "serve it anyway")
            self.warnings.append(f"WARNING: {t.path}: {why}; served because of --allow-failed")
        self.draining = False
        owner = next((t for t in self.targets if t.tail() is not None), None)
        if owner is None:
            raise UserError(f"{out}: no ONNX tail (tail.onnx) in any target; export with --target onnx too")
        self.tail_target, self.tail_artifact = owner, owner.tail()
        assert self.tail_artifact is not None
        self.card = owner.card
        self.name, self.version = name or tail_model_name(self.card), "1"
        self.contracts: dict[str, WireContract] = {}
        self._owner: dict[str, TargetExport] = {}
        for t in self.targets:
            if t.card != self.card:
                raise UserError(f"{t.path}: its model card differs from {owner.path}'s; serve one export at a time")
            for c in t.contracts:
                self.contracts[c.contract_id] = c
                self._owner[c.contract_id] = t
        self._tables: dict[str, codecs.CodecTables] = {}
        self._tables_lock = threading.Lock()
        ispec, ospec = self.tail_artifact.inputs[0], self.tail_artifact.outputs[0]
        self.input_name, self.output_name = ispec.name, ospec.name
        self.sample_shape = tuple(int(d) for d in ispec.shape[1:])
        self.output_shape = tuple(int(d) for d in ospec.shape[1:])
        self._tmp = tempfile.TemporaryDirectory(prefix="bottlefit-serve-")
        try:
            dyn = Path(self._tmp.name) / "tail.batch.onnx"
            self.batchable = dynamic_batch_onnx(owner.path / self.tail_artifact.file, dyn)
            path = dyn if self.batchable else owner.path / self.tail_artifact.file
            self.runner = get_runner("onnxruntime", path, num_threads=threads)
        except BaseException:
            self._tmp.cleanup()
            raise
        self.max_batch = max_batch if self.batchable else 1
        self.stats = Stats()
        self.batcher = Batcher(self._run, self.stats, self.max_batch, max_delay_ms / 1e3, workers, queue_size)

    @property
    def ready(self) -> bool:
        return not (self.draining or self.batcher.closed)

    # -- metadata

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [self.version], "platform": "onnxruntime_onnx",
                "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.sample_shape]}],
                "outputs": [{"name": self.output_name, "datatype": "FP32", "shape": [-1, *self.output_shape]}]}

    def contracts_info(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.contracts.values()]

    def tables(self, contract: WireContract) -> codecs.CodecTables:
        with self._tables_lock:
            if contract.contract_id not in self._tables:
                self._tables[contract.contract_id] = load_tables(self._owner[contract.contract_id], contract)
            return self._tables[contract.contract_id]

    # -- inputs

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.batchable:
            return self.runner.infer({self.input_name: x})[self.output_name]
        return np.concatenate([self.runner.infer({self.input_name: x[i : i + 1]})[self.output_name]
                               for i in range(x.shape[0])])

    def _batch_dim(self, shape: list[int], rank: int) -> int:
        if len(shape) != rank or any((not isinstance(d, int)) or d < 0 for d in shape):
            raise bad(f"input {self.input_name!r} has shape {shape}; expected rank {rank} with the batch first")
        b = shape[0]
        if not 1 <= b <= max(self.max_batch, 1) * 4:
            raise bad(f"batch of {b} is outside 1..{max(self.max_batch, 1) * 4}")
        return b

    def _array(self, t: TensorIn, dtype: np.dtype) -> np.ndarray:
        n = int(np.prod(t.shape))
        if isinstance(t.data, bytes | bytearray | memoryview):
            raw = bytes(t.data)
            if len(raw) != n * dtype.itemsize:
                raise bad(f"input {t.name!r}: {len(raw)} bytes of data for shape {t.shape} {t.datatype} "
                          f"({n * dtype.itemsize} expected)")
            return np.frombuffer(raw, dtype=dtype).reshape(t.shape)
        try:
            arr = np.asarray(t.data)
            if arr.dtype.kind not in "iuf" or arr.size != n:
                raise ValueError(f"{arr.size} numbers of kind {arr.dtype.kind!r}")
            if dtype.kind in "iu" and arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
                raise ValueError("non-integer values")
            info = np.iinfo(dtype) if dtype.kind in "iu" else None
            if info is not None and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"values outside {dtype.name}")
            return arr.astype(dtype).reshape(t.shape)
        except (ValueError, TypeError) as e:
            raise bad(f"input {t.name!r}: data does not fit shape {t.shape} {t.datatype} ({e})") from None

    def _contract_param(self, params: dict[str, Any]) -> WireContract | None:
        cid = params.get("contract_id")
        if cid is None:
            return None
        c = self.contracts.get(str(cid))
        if c is None:
            known = ", ".join(f"{k} ({v.target}/{v.head})" for k, v in self.contracts.items())
            raise bad(f"contract_id {cid!r} is not served here (serving {known}): the client's head belongs to "
                      "another export")
        return c

    def decode(self, inputs: list[TensorIn]) -> np.ndarray:
        """The request's inputs -> the float NCHW bottleneck batch for the tail (InferError 400 when malformed)."""
        if len(inputs) != 1:
            raise bad(f"expected exactly one input {self.input_name!r}, got {len(inputs)}")
        t = inputs[0]
        if t.name != self.input_name:
            raise bad(f"unknown input {t.name!r}; model {self.name!r} takes {self.input_name!r}")
        contract = self._contract_param(t.parameters or {})
        if t.datatype == "FP32":
            return self._decode_fp32(t)
        if t.datatype in ("INT8", "UINT8"):
            return self._decode_codes(t, contract)
        if t.datatype == "BYTES":
            return self._decode_frames(t, contract)
        raise bad(f"datatype {t.datatype!r} not accepted for {self.input_name!r}: send FP32, INT8/UINT8 codes with "
                  "scale and zero_point, or BYTES frames with a codec")

    def _decode_fp32(self, t: TensorIn) -> np.ndarray:
        """The dequantized bottleneck sent as it is: its shape and finiteness checked."""
        b = self._batch_dim(t.shape, 1 + len(self.sample_shape))
        if tuple(t.shape[1:]) != self.sample_shape:
            raise bad(f"FP32 input shape {t.shape}; expected [{b}, {', '.join(map(str, self.sample_shape))}]")
        x = self._array(t, DTYPES["FP32"])
        if not np.isfinite(x).all():
            raise bad("FP32 input holds NaN or infinity")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _code_affine(self, t: TensorIn, contract: WireContract | None) -> tuple[float, int, str]:
        """(scale, zero point, layout) of INT8/UINT8 codes: the contract's (the request's own must agree), else the
        request's parameters."""
        p = t.parameters or {}
        if contract is not None:
            if V2_TYPES.get(contract.dtype) != t.datatype:
                raise bad(f"contract {contract.contract_id} sends {V2_TYPES.get(contract.dtype)}, got {t.datatype}")
            for key, want in (("scale", contract.scale), ("zero_point", contract.zero_point)):
                if key in p and np.float32(number_param(p, key)) != np.float32(want):
                    raise bad(f"{key}={p[key]} differs from contract {contract.contract_id}'s {want}")
            return float(contract.scale or 0), int(contract.zero_point or 0), contract.layout
        lo, hi = np.iinfo(DTYPES[t.datatype]).min, np.iinfo(DTYPES[t.datatype]).max
        if "scale" not in p or "zero_point" not in p:
            raise bad(f"{t.datatype} input needs parameters scale and zero_point (or contract_id)")
        scale, zp = number_param(p, "scale"), int_param(p, "zero_point", int(lo), int(hi))
        layout = str(p.get("layout", "NCHW"))
        if layout not in ("NCHW", "NHWC") or not scale > 0:
            raise bad(f"bad layout {layout!r} or scale {scale} (a positive number)")
        return scale, zp, layout

    def _decode_codes(self, t: TensorIn, contract: WireContract | None) -> np.ndarray:
        """INT8/UINT8 codes, dequantized with the contract's (or the request's) affine, NHWC turned NCHW."""
        scale, zp, layout = self._code_affine(t, contract)
        c, h, w = self.sample_shape
        want = [c, h, w] if layout == "NCHW" else [h, w, c]
        b = self._batch_dim(t.shape, 4)
        if list(t.shape[1:]) != want:
            raise bad(f"{t.datatype} input shape {t.shape}; expected [{b}, {', '.join(map(str, want))}] "
                      f"({layout})")
        q = self._array(t, DTYPES[t.datatype])
        with np.errstate(over="ignore", invalid="ignore"):
            x = (q.astype(np.float32) - np.float32(zp)) * np.float32(scale)
        if not np.isfinite(x).all():  # e.g. scale 1e38: float32 overflows to inf, the tail to NaN
            raise bad(f"{t.datatype} codes times scale {scale} overflow float32 (NaN or infinity); send the "
                      "head's own scale")
        if layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def _decode_frames(self, t: TensorIn, contract: WireContract | None) -> np.ndarray:
        """BYTES: one coded frame per batch element, each decoded against the accepted contracts and dequantized."""
        b = self._batch_dim(t.shape, 1)
        frames = t.data if isinstance(t.data, list) else split_bytes_elements(bytes(t.data or b""), b)
        if len(frames) != b:
            raise bad(f"BYTES input has {len(frames)} elements, its shape says {b}")
        want_codec = (t.parameters or {}).get("codec")
        out = []
        for i, f in enumerate(frames):
            try:
                hdr = codecs.read_header(f)
                if want_codec is not None and want_codec != hdr.codec:
                    raise codecs.CodecError(f"parameter codec={want_codec!r} but the frame is {hdr.codec!r}")
                fc, codes = codecs.decode_frame(f, self.contracts, self.tables)
            except codecs.CodecError as e:
                raise bad(f"element {i}: {e}") from None
            if contract is not None and fc.contract_id != contract.contract_id:
                raise bad(f"element {i} is for contract {fc.contract_id}, parameter says {contract.contract_id}")
            if fc.nchw_shape != self.sample_shape:
                raise bad(f"element {i}: contract shape {fc.nchw_shape} is not the tail's {self.sample_shape}")
            out.append(fc.dequantize(codes[None])[0])
        return np.ascontiguousarray(np.stack(out), dtype=np.float32)

    def infer(self, inputs: list[TensorIn]) -> Future[np.ndarray]:
        t0 = time.perf_counter_ns()
        try:
            x = self.decode(inputs)
        except InferError:
            self.stats.add("fail", time.perf_counter_ns() - t0)
            raise
        self.stats.add("compute_input", time.perf_counter_ns() - t0)
        fut = self.batcher.submit(x)

        def done(f: Future[np.ndarray]) -> None:
            self.stats.add("fail" if f.exception() else "success", time.perf_counter_ns() - t0)

        fut.add_done_callback(done)
        return fut

    def close(self) -> None:
        self.batcher.close()
        self._tmp.cleanup()


def parity_failure(target: TargetExport) -> str | None:
    """Why this export's recorded verdict is not a pass (its manifest's parity section), or None."""
    parity = target.manifest.get("parity")
    if not isinstance(parity, dict) or "passed" not in parity:
        return "its manifest records no parity verdict"
    if parity["passed"] is True:
        return None
    failed = sorted({f"{c.get('artifact')} {c.get('metric')}" for c in parity.get("checks", [])
                     if isinstance(c, dict) and c.get("passed") is False})
    return "its export failed parity" + (f" ({', '.join(failed[:4])}{', ...' if len(failed) > 4 else ''})"
                                         if failed else "")


def server_metadata() -> dict[str, Any]:
    return {"name": "bottlefit", "version": __version__, "extensions": ["binary_tensor_data", "statistics"]}
