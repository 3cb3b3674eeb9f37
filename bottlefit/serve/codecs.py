"""Lossless codecs for one image's int8/uint8 bottleneck codes, and the frame that carries them.

Codecs (``CODECS``):

- ``raw``: the codes as they are, C-order in the contract's layout;
- ``zstd``: zstandard level 19 over the raw codes;
- ``entropy``: range coding (constriction) with a per-channel categorical model fitted on the calibration set;
- ``context``: rANS with a context model (:mod:`bottlefit.serve.boardcodec`): each symbol is predicted from its
  already-decoded spatial neighbours and the previous channels, and its residual's distribution depends on the
  neighbours' error energy and on how near the prediction is to the zero point (which has its own probability).
  The encoder is pure Python + numpy (the board bundles ship it); the decoder is constriction's AnsCoder, one
  wavefront of every active channel per call.

Frame (little-endian), one image::

    b"BF" | u8 version<<4 | codec | u8 dtype (0 int8, 1 uint8) | 6 bytes contract id | 4 bytes model-table id
    | u32 crc32 of the codes | f32 scale | i16 zero_point | u8 ndim | u16 x ndim shape | payload

Decoding is bit-exact; a frame for another contract, another fitted model, a damaged stream (crc) or a shape
that is not the contract's is refused with a :class:`CodecError` naming what differs.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bottlefit.serve import boardcodec
from bottlefit.serve.contract import WireContract

MAGIC = boardcodec.MAGIC
VERSION = boardcodec.VERSION
CODECS = boardcodec.CODECS
_CODEC_ID = {name: i for i, name in enumerate(CODECS)}
_DTYPES = boardcodec.DTYPES
_FIXED = boardcodec.HEADER
_SMOOTH_CTX = 64.0  # pseudo-counts pulling a context's residual histogram towards its channel's
_RESIDUAL_SCALE = 1 << 20  # integer weight of a whole residual histogram
_IRLS_STEPS = 6  # least-absolute-deviation fit of the predictor by iteratively reweighted least squares
_FIT_ROWS = 16384  # rows of one predictor fit


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


@dataclass(frozen=True, eq=False)
class CodecTables:
    """Symbol statistics of one contract's codes on the calibration set (integers only: the bytes are
    reproducible, and the board computes the same frequencies). ``context``: the context model's arrays by
    :data:`boardcodec.TABLE_KEYS`."""

    contract_id: str
    marginal_counts: np.ndarray  # (C, 256) int64
    context: Mapping[str, np.ndarray]

    @property
    def table_id(self) -> bytes:
        return boardcodec.table_id(self.marginal_counts, self.context)

    def marginal(self) -> np.ndarray:
        return boardcodec.marginal(self.marginal_counts)

    def arrays(self) -> dict[str, np.ndarray]:
        """The context model's arrays and ``marginal_counts``, as :func:`boardcodec.decode_symbols` takes them."""
        return {**self.context, "marginal_counts": self.marginal_counts}

    def cumulative(self) -> np.ndarray:
        cum = self.__dict__.get("_cum")
        if cum is None:
            cum = boardcodec.cumulative(self.context)
            object.__setattr__(self, "_cum", cum)
        return cum

    def to_bytes(self) -> bytes:
        """An .npz (zip of .npy) with fixed timestamps: the same tables give the same bytes."""
        arrays = {"contract_id": np.array(self.contract_id), "marginal_counts": self.marginal_counts,
                  **{k: np.asarray(self.context[k], dtype=np.int64) for k in boardcodec.TABLE_KEYS}}
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, a in arrays.items():
                npy = io.BytesIO()
                np.lib.format.write_array(npy, np.asarray(a).copy(order="C"), allow_pickle=False)
                z.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), npy.getvalue(),
                           compress_type=zipfile.ZIP_DEFLATED)
        return buf.getvalue()

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> CodecTables:
        """Raises CodecError for a file that is not a tables file of this version."""
        try:
            with np.load(path, allow_pickle=False) as z:
                cid = str(np.asarray(z["contract_id"]).reshape(-1)[0])
                return cls(cid, np.asarray(z["marginal_counts"], dtype=np.int64),
                           {k: np.asarray(z[k], dtype=np.int64) for k in boardcodec.TABLE_KEYS})
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
            raise CodecError(f"{path}: not a codec tables file of this version ({e}); re-export") from None


def _lad_fit(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least absolute deviations (IRLS on the normal equations, a tiny ridge for rank-deficient features) of y
    on f: robust to the zero-point spike and to outliers. At most ``_FIT_ROWS`` rows (an even stride): the fit
    runs in every export."""
    step = -(-len(y) // _FIT_ROWS)
    f, y = f[::step], y[::step]
    wgt = np.ones_like(y)
    b = np.zeros(f.shape[1])
    for _ in range(_IRLS_STEPS + 1):
        fw = f * wgt[:, None]
        a = fw.T @ f
        a[np.diag_indices_from(a)] += 1e-10 * max(float(np.trace(a)), 1.0)
        b = np.linalg.solve(a, fw.T @ y)
        wgt = 1.0 / np.maximum(np.abs(y - f @ b), 1.0)
    return b


def _quantile_edges(x: np.ndarray, n: int) -> np.ndarray:
    return np.quantile(x, np.arange(1, n) / n, method="lower").astype(np.int64)


def fit_context(sym: np.ndarray, zero_symbol: int) -> dict[str, np.ndarray]:
    """The context model's integer tables from calibration symbols ``sym`` (N, C, H, W) uint8."""
    bc = boardcodec
    s = np.asarray(sym, dtype=np.int64)
    n, c_count, h, w = s.shape
    nb = bc.Neighbourhood(h, w, *np.divmod(np.arange(h * w), w))
    s = s.reshape(n, c_count, h * w)
    fill = np.median(s.transpose(1, 0, 2).reshape(c_count, -1), axis=1).astype(np.int64)
    nf = bc.n_features(c_count - 1)
    weights = np.zeros((c_count, bc.N_GRAD, nf), np.int64)
    grad_edges = np.zeros((c_count, bc.N_GRAD - 1), np.int64)
    for c in range(c_count):
        fs, gs = zip(*(bc.features(s[i], c, nb, int(fill[c])) for i in range(n)), strict=True)
        f, g, y = np.concatenate(fs).astype(np.float64), np.concatenate(gs), s[:, c].reshape(-1).astype(np.float64)
        grad_edges[c] = _quantile_edges(g, bc.N_GRAD)
        cls = np.searchsorted(grad_edges[c], g, side="right")
        whole = _lad_fit(f, y)
        for k in range(bc.N_GRAD):
            m = cls == k
            b = _lad_fit(f[m], y[m]) if m.sum() > 4 * f.shape[1] else whole
            weights[c, k, : f.shape[1]] = np.rint(np.clip(b, -4096, 4096) * (1 << bc.FRAC)).astype(np.int64)
    tables = {"zero_symbol": np.array(zero_symbol, np.int64), "fill": fill, "grad_edges": grad_edges,
              "weights": weights, "energy_edges": np.zeros((c_count, bc.N_ENERGY - 1), np.int64)}
    pred = np.zeros_like(s)
    for i in range(n):
        for c in range(c_count):
            pred[i, c] = bc.prediction(tables, s[i], c, nb)
    res = s - pred
    energies = [np.concatenate([bc.energy(res[i], c, nb) for i in range(n)]) for c in range(c_count)]
    tables["energy_edges"] = np.stack([_quantile_edges(e, bc.N_ENERGY) for e in energies])
    n_res = c_count * bc.N_ENERGY * bc.N_NEAR
    counts = np.zeros((n_res, 511), np.float64)
    zero = np.zeros((c_count * bc.N_NEAR * bc.N_ZERO * bc.N_ZERO_ENERGY, 2), np.int64)
    for i in range(n):
        for c in range(c_count):
            k, zk = bc.contexts(tables, s[i], res[i], c, nb, pred[i, c])
            nz = s[i, c] != zero_symbol
            np.add.at(counts, (k[nz], res[i, c][nz] + 255), 1)
            np.add.at(zero, (zk, 0), (~nz).astype(np.int64))
            np.add.at(zero, (zk, 1), 1)
    per_channel = counts.reshape(c_count, -1, 511).sum(axis=1) + 1e-2
    prior = np.repeat(per_channel / per_channel.sum(axis=1, keepdims=True), n_res // c_count, axis=0)
    p = (counts + _SMOOTH_CTX * prior) / (counts.sum(axis=1, keepdims=True) + _SMOOTH_CTX)
    tables["residual"] = (np.floor(p * _RESIDUAL_SCALE) + 1).astype(np.int64).reshape(
        c_count, bc.N_ENERGY, bc.N_NEAR, 511)
    tables["zero"] = zero.reshape(c_count, bc.N_NEAR, bc.N_ZERO, bc.N_ZERO_ENERGY, 2)
    return tables


def zero_symbol(contract: WireContract) -> int:
    """The symbol of the contract's zero point (an exact 0.0 of the float bottleneck)."""
    return int(contract.zero_point or 0) + (128 if contract.dtype == "int8" else 0)


def fit_tables(contract: WireContract, sym: np.ndarray) -> CodecTables:
    """Fit both models on calibration symbols ``sym`` (N, C, H, W) uint8."""
    sym = np.asarray(sym, dtype=np.uint8)
    c = sym.shape[1]
    marginal = np.stack([np.bincount(sym[:, ch].ravel(), minlength=256) for ch in range(c)]).astype(np.int64)
    return CodecTables(contract.contract_id, marginal, fit_context(sym, zero_symbol(contract)))


# -- coding


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
    return boardcodec.encode(tables.context, sym)


def _decode_payload(codec: str, payload: bytes, shape: tuple[int, int, int], tables: CodecTables | None
                    ) -> np.ndarray:
    """The payload -> symbols, by the one decoder the Triton repository's decode step also ships
    (:func:`boardcodec.decode_symbols`)."""
    try:
        return boardcodec.decode_symbols(codec, payload, shape, None if tables is None else tables.arrays(),
                                         None if tables is None or codec != "context" else tables.cumulative())
    except ValueError as e:
        raise CodecError(str(e)) from None


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
    head = boardcodec.pack_header(codec, contract.dtype, contract.contract_id, table_id, sym,
                                  float(contract.scale or 0.0), int(contract.zero_point or 0), contract.shape)
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
    try:
        return FrameHeader(*boardcodec.parse_header(frame))
    except ValueError as e:
        raise CodecError(str(e)) from None


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
    try:
        boardcodec.check_frame(hdr.dtype, hdr.shape, hdr.scale, hdr.zero_point, contract.to_dict())
    except ValueError as e:
        raise CodecError(str(e)) from None
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
    try:
        boardcodec.check_crc(hdr.codec, sym, hdr.crc)
    except ValueError as e:
        raise CodecError(str(e)) from None
    return contract, from_symbols(contract, sym)
