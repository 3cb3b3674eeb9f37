"""Lossless codecs for one image's int8/uint8 bottleneck codes, and the frame that carries them.

Codecs (``CODECS``):

- ``raw``: the codes as they are, C-order in the contract's layout;
- ``zstd``: zstandard level 19 over the raw codes;
- ``entropy``: range coding (constriction) with a per-channel categorical model fitted on the calibration set;
- ``context``: range coding with a context-adaptive model: each symbol's distribution depends on its channel and
  on its already-decoded left and upper neighbours (a bucket of their mean and of their difference). Symbols are
  coded along anti-diagonals, so the decoder decodes one whole diagonal (every channel) per call.

Frame (little-endian), one image::

    b"BF" | u8 version<<4 | codec | u8 dtype (0 int8, 1 uint8) | 6 bytes contract id | 4 bytes model-table id
    | u32 crc32 of the codes | f32 scale | i16 zero_point | u8 ndim | u16 x ndim shape | payload

Decoding is bit-exact; a frame for another contract, another fitted model, a damaged stream (crc) or a shape
that is not the contract's is refused with a :class:`CodecError` naming what differs.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bottlefit.serve.contract import WireContract

MAGIC = b"BF"
VERSION = 1
CODECS = ("raw", "zstd", "entropy", "context")
_CODEC_ID = {name: i for i, name in enumerate(CODECS)}
_DTYPES = ("int8", "uint8")
_FIXED = struct.Struct("<2sBB6s4sIfhB")
K_PRED = 8  # buckets of the neighbours' mean (per channel, calibration quantiles)
K_GRAD = 3  # buckets of |left - up|
N_CTX = 1 + K_PRED * K_GRAD  # context 0: no decoded neighbour yet
_SMOOTH_CTX = 32.0  # pseudo-counts pulling a context's distribution towards its channel's marginal
_FLOOR = 1e-3  # pseudo-count per symbol in the channel marginal


class CodecError(ValueError):
    """A frame that cannot be decoded for this contract (the message says why)."""


# -- symbols: codes in the contract's layout <-> uint8 symbols in C,H,W order


def to_symbols(contract: WireContract, codes: np.ndarray) -> np.ndarray:
    c = np.asarray(codes).reshape(contract.shape)
    if contract.layout == "NHWC":
        c = c.transpose(2, 0, 1)
    s = c.astype(np.int16) + (128 if contract.dtype == "int8" else 0)
    return np.ascontiguousarray(s.astype(np.uint8))


def from_symbols(contract: WireContract, sym: np.ndarray) -> np.ndarray:
    s = sym.astype(np.int16) - (128 if contract.dtype == "int8" else 0)
    c = s.astype(contract.dtype)
    if contract.layout == "NHWC":
        c = c.transpose(1, 2, 0)
    return np.ascontiguousarray(c)


def entropy_bits(sym: np.ndarray, per_channel: bool = False) -> float:
    """Empirical order-0 entropy in bits of all symbols ``sym`` (N, C, H, W) (per channel: summed over channels
    of each channel's own histogram)."""
    sym = np.asarray(sym)
    groups = [sym[:, c].ravel() for c in range(sym.shape[1])] if per_channel else [sym.ravel()]
    total = 0.0
    for g in groups:
        p = np.bincount(g, minlength=256) / g.size
        p = p[p > 0]
        total += -float((p * np.log2(p)).sum()) * g.size
    return total


# -- the fitted models


@dataclass(frozen=True)
class CodecTables:
    """Symbol statistics of one contract's codes on the calibration set (integer counts: bytes are reproducible)."""

    contract_id: str
    marginal_counts: np.ndarray  # (C, 256) int64
    context_counts: np.ndarray  # (C, N_CTX, 256) int64
    pred_edges: np.ndarray  # (C, K_PRED - 1) int64
    grad_edges: np.ndarray  # (K_GRAD - 1,) int64

    @property
    def table_id(self) -> bytes:
        h = hashlib.sha256()
        for a in (self.marginal_counts, self.context_counts, self.pred_edges, self.grad_edges):
            h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
        return h.digest()[:4]

    def marginal(self) -> np.ndarray:
        m = self.marginal_counts.astype(np.float64) + _FLOOR
        return m / m.sum(axis=1, keepdims=True)

    def conditional(self) -> np.ndarray:
        m = self.marginal()[:, None, :]
        n = self.context_counts.astype(np.float64)
        p = (n + _SMOOTH_CTX * m) / (n.sum(axis=2, keepdims=True) + _SMOOTH_CTX)
        return p

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, contract_id=np.array(self.contract_id), marginal_counts=self.marginal_counts,
                 context_counts=self.context_counts, pred_edges=self.pred_edges, grad_edges=self.grad_edges)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> CodecTables:
        with np.load(path, allow_pickle=False) as z:
            return cls(str(z["contract_id"]), z["marginal_counts"], z["context_counts"], z["pred_edges"],
                       z["grad_edges"])


def _contexts(sym: np.ndarray, pred_edges: np.ndarray, grad_edges: np.ndarray) -> np.ndarray:
    """The context of every symbol of ``sym`` (N, C, H, W), from its left and upper neighbours."""
    s = sym.astype(np.int64)
    n, c, h, w = s.shape
    left = np.full_like(s, -1)
    up = np.full_like(s, -1)
    left[..., 1:] = s[..., :-1]
    up[..., 1:, :] = s[..., :-1, :]
    has_l, has_u = left >= 0, up >= 0
    pred = np.where(has_l & has_u, (left + up) // 2, np.where(has_l, left, up))
    grad = np.where(has_l & has_u, np.abs(left - up), 0)
    pb = np.empty_like(s)
    for ch in range(c):
        pb[:, ch] = np.searchsorted(pred_edges[ch], pred[:, ch], side="right")
    gb = np.searchsorted(grad_edges, grad, side="right")
    return np.where(has_l | has_u, 1 + pb * K_GRAD + gb, 0)


def fit_tables(contract: WireContract, sym: np.ndarray) -> CodecTables:
    """Fit both models on calibration symbols ``sym`` (N, C, H, W) uint8."""
    sym = np.asarray(sym, dtype=np.uint8)
    n, c, h, w = sym.shape
    marginal = np.stack([np.bincount(sym[:, ch].ravel(), minlength=256) for ch in range(c)]).astype(np.int64)
    qs = np.arange(1, K_PRED) / K_PRED
    pred_edges = np.stack([np.quantile(sym[:, ch], qs, method="lower") for ch in range(c)]).astype(np.int64)
    s = sym.astype(np.int64)
    grads = np.abs(s[..., 1:, 1:] - s[..., :-1, 1:]) if h > 1 and w > 1 else np.zeros(1, np.int64)
    grad_edges = np.quantile(grads, np.arange(1, K_GRAD) / K_GRAD, method="lower").astype(np.int64)
    ctx = _contexts(sym, pred_edges, grad_edges)
    counts = np.zeros((c, N_CTX, 256), np.int64)
    chan = np.broadcast_to(np.arange(c)[None, :, None, None], sym.shape)
    np.add.at(counts, (chan.ravel(), ctx.ravel(), s.ravel()), 1)
    return CodecTables(contract.contract_id, marginal, counts, pred_edges, grad_edges)


# -- coding


def _diagonals(h: int, w: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for d in range(h + w - 1):
        hs = np.arange(max(0, d - w + 1), min(h, d + 1))
        out.append((hs, d - hs))
    return out


def _range_encode(symbols: np.ndarray, probs: np.ndarray) -> bytes:
    import constriction

    enc = constriction.stream.queue.RangeEncoder()
    enc.encode(symbols.astype(np.int32), constriction.stream.model.Categorical(perfect=False), probs)
    return enc.get_compressed().astype("<u4").tobytes()


def _encode_payload(codec: str, sym: np.ndarray, tables: CodecTables | None) -> bytes:
    if codec == "raw":
        return sym.tobytes()
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=19).compress(sym.tobytes())
    assert tables is not None
    c, h, w = sym.shape
    if codec == "entropy":
        probs = np.repeat(tables.marginal(), h * w, axis=0)
        return _range_encode(sym.ravel(), probs)
    cond = tables.conditional()
    ctx = _contexts(sym[None], tables.pred_edges, tables.grad_edges)[0]
    chans, rows = [], []
    for hs, ws in _diagonals(h, w):
        chans.append(np.repeat(np.arange(c), hs.size))
        rows.append((np.tile(hs, c), np.tile(ws, c)))
    ch = np.concatenate(chans)
    hh = np.concatenate([r[0] for r in rows])
    ww = np.concatenate([r[1] for r in rows])
    return _range_encode(sym[ch, hh, ww], cond[ch, ctx[ch, hh, ww]])


def _decode_payload(codec: str, payload: bytes, shape: tuple[int, int, int], tables: CodecTables | None
                    ) -> np.ndarray:
    c, h, w = shape
    n = c * h * w
    if codec == "raw":
        if len(payload) != n:
            raise CodecError(f"raw payload has {len(payload)} bytes, expected {n}")
        return np.frombuffer(payload, dtype=np.uint8).reshape(shape).copy()
    if codec == "zstd":
        import zstandard

        try:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=n)
        except zstandard.ZstdError as e:
            raise CodecError(f"invalid zstd stream ({e})") from None
        if len(data) != n:
            raise CodecError(f"zstd stream holds {len(data)} bytes, expected {n}")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape).copy()
    import constriction

    assert tables is not None
    if len(payload) % 4 or not payload:
        raise CodecError(f"range-coded stream of {len(payload)} bytes is not a whole number of 32-bit words")
    family = constriction.stream.model.Categorical(perfect=False)
    try:
        dec = constriction.stream.queue.RangeDecoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
        if codec == "entropy":
            probs = np.repeat(tables.marginal(), h * w, axis=0)
            return np.asarray(dec.decode(family, probs), dtype=np.uint8).reshape(shape)
        cond = tables.conditional()
        sym = np.zeros((1, c, h, w), np.uint8)
        ch_all = np.arange(c)
        for hs, ws in _diagonals(h, w):
            ctx = _contexts(sym, tables.pred_edges, tables.grad_edges)[0]
            chs = np.repeat(ch_all, hs.size)
            hh, ww = np.tile(hs, c), np.tile(ws, c)
            sym[0, chs, hh, ww] = np.asarray(dec.decode(family, cond[chs, ctx[chs, hh, ww]]), dtype=np.uint8)
        return sym[0]
    except (ValueError, RuntimeError, AssertionError) as e:
        raise CodecError(f"invalid {codec} stream ({e})") from None


def encode_frame(contract: WireContract, codes: np.ndarray, codec: str, tables: CodecTables | None = None) -> bytes:
    """One image's codes (the contract's shape, layout and dtype) -> a self-describing frame."""
    if codec not in _CODEC_ID:
        raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    if not contract.quantized:
        raise ValueError(f"contract {contract.contract_id} ({contract.head}) is {contract.dtype}: codecs code "
                         "integer codes only")
    codes = np.asarray(codes)
    if codes.dtype != np.dtype(contract.dtype) or codes.size != int(np.prod(contract.shape)):
        raise ValueError(f"codes {codes.dtype}{list(codes.shape)} do not fit contract {contract.contract_id} "
                         f"({contract.dtype}{list(contract.shape)})")
    if codec in ("entropy", "context"):
        if tables is None or tables.contract_id != contract.contract_id:
            raise ValueError(f"codec {codec!r} needs the tables fitted for contract {contract.contract_id}")
    sym = to_symbols(contract, codes)
    table_id = tables.table_id if codec in ("entropy", "context") and tables is not None else b"\0" * 4
    head = _FIXED.pack(MAGIC, VERSION << 4 | _CODEC_ID[codec], _DTYPES.index(contract.dtype),
                       bytes.fromhex(contract.contract_id), table_id, zlib.crc32(sym.tobytes()),
                       float(contract.scale or 0.0), int(contract.zero_point or 0), len(contract.shape))
    head += struct.pack(f"<{len(contract.shape)}H", *contract.shape)
    return head + _encode_payload(codec, sym, tables)


@dataclass(frozen=True)
class FrameHeader:
    codec: str
    dtype: str
    contract_id: str
    table_id: bytes
    crc: int
    scale: float
    zero_point: int
    shape: tuple[int, ...]
    size: int  # header bytes


def read_header(frame: bytes) -> FrameHeader:
    if len(frame) < _FIXED.size:
        raise CodecError(f"frame of {len(frame)} bytes is shorter than its {_FIXED.size}-byte header")
    magic, vc, dt, cid, tid, crc, scale, zp, ndim = _FIXED.unpack_from(frame)
    if magic != MAGIC or vc >> 4 != VERSION:
        raise CodecError("not a bottlefit wire frame (bad magic or version)")
    if (vc & 15) >= len(CODECS) or dt >= len(_DTYPES):
        raise CodecError(f"unknown codec id {vc & 15} or dtype id {dt}")
    end = _FIXED.size + 2 * ndim
    if ndim > 8 or len(frame) < end:
        raise CodecError("frame header truncated")
    shape = struct.unpack_from(f"<{ndim}H", frame, _FIXED.size)
    return FrameHeader(CODECS[vc & 15], _DTYPES[dt], cid.hex(), tid, crc, scale, zp, tuple(shape), end)


def decode_frame(frame: bytes, contracts: Mapping[str, WireContract],
                 tables_for: Callable[[WireContract], CodecTables] | None = None) -> tuple[WireContract, np.ndarray]:
    """A frame -> (its contract, the image's codes in the contract's layout), bit-exact.

    ``contracts``: the contracts this side accepts, by id. Raises CodecError for a frame made for another contract
    or another fitted model, a header that disagrees with the contract, or a damaged stream."""
    hdr = read_header(frame)
    contract = contracts.get(hdr.contract_id)
    if contract is None:
        known = ", ".join(f"{c.contract_id} ({c.target}/{c.head})" for c in contracts.values()) or "none"
        raise CodecError(f"payload made for contract {hdr.contract_id}, which this side does not serve (it serves "
                         f"{known}): the head that sent it belongs to another export; deploy the matching export")
    if hdr.dtype != contract.dtype or hdr.shape != tuple(contract.shape):
        raise CodecError(f"frame says {hdr.dtype}{list(hdr.shape)}, contract {contract.contract_id} is "
                         f"{contract.dtype}{list(contract.shape)}")
    if np.float32(hdr.scale) != np.float32(contract.scale) or hdr.zero_point != contract.zero_point:
        raise CodecError(f"frame's scale/zero point {hdr.scale}/{hdr.zero_point} differ from contract "
                         f"{contract.contract_id}'s {contract.scale}/{contract.zero_point}")
    tables = None
    if hdr.codec in ("entropy", "context"):
        if tables_for is None:
            raise CodecError(f"codec {hdr.codec!r} is not available here (no fitted tables)")
        tables = tables_for(contract)
        if tables.table_id != hdr.table_id:
            raise CodecError(f"frame was coded with model table {hdr.table_id.hex()}, this side has "
                             f"{tables.table_id.hex()} for contract {contract.contract_id}: fit the tables on the "
                             "same calibration set (or ship the tables file with the export)")
    sym = _decode_payload(hdr.codec, frame[hdr.size:], contract.nchw_shape, tables)  # type: ignore[arg-type]
    if zlib.crc32(sym.tobytes()) != hdr.crc:
        raise CodecError(f"invalid {hdr.codec} stream: decoded codes fail the frame's crc32")
    return contract, from_symbols(contract, sym)
