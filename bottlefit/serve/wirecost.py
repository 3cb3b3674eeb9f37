"""What the board's wire encoder costs the board: guest instructions per frame of each codec the board's own
coder (:mod:`bottlefit.serve.boardcodec`) encodes, counted under qemu arm64 emulation on a Pi core with the Pi's
Python and numpy (:mod:`bottlefit.emulation.cost`).

A guest process loads the tables and a few frames' symbols, encodes one frame per codec as a warm-up (the board's
first frame: the shape's coding plan is built then and cached for every later frame), then ``runs`` frames between
two marks; the span divided by ``runs`` is one frame's steady-state cost. Codecs the board encodes: ``raw`` (the
frame header and the symbols) and ``context``; ``zstd`` and ``entropy`` are server-side codecs (their encoders need
zstandard / constriction, which a board bundle does not ship).

:func:`encode_instructions` caches its answer under ``cache_dir()/board-codec-cost/``, keyed by the codec, the
core, the frame shape, the sha256 of the boardcodec source counted, the tables' id and the sysroot's key: the count
depends a little on the data (rANS renormalisations, adaptive rows touched), so the frames counted are part of the
answer's description, not of its key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bottlefit.emulation.arm64 import Core, Sysroot, cache_dir
from bottlefit.serve import boardcodec

BOARD_CODECS = ("raw", "context")  # the codecs a board's client encodes with boardcodec alone
# the board's optional compiler of the context encoder (boardcodec._kernels): aarch64 cp311 wheels, an overlay
# beside the sysroot (bottlefit.emulation.cost.ensure_overlay) so the sysroot's key and build stay as they are;
# numba 0.68 admits the sysroot's numpy 2.4 (numba needs numpy < 2.6)
JIT_WHEELS: tuple[str, ...] = ("numba==0.68.1", "llvmlite==0.50.0")

GUEST = '''\
import json
import os
import sys

import numpy as np

import boardcodec


def mark():
    try:
        os.close(@MARK_FD@)
    except OSError:
        pass


tables = boardcodec.load(sys.argv[1])
sym = np.load(sys.argv[2])
codecs, runs, dtype = sys.argv[3].split(","), int(sys.argv[4]), sys.argv[5]
layout, scale, zp = "NCHW", 0.05, 0
# what the head hands the client: the contract's codes, NCHW
codes = [(s.astype(np.int16) - (128 if dtype == "int8" else 0)).astype(dtype) for s in sym]


def raw(c):
    s = boardcodec.symbols(c, dtype, layout)
    return boardcodec.pack_header("raw", dtype, tables["contract_id"], b"\\0" * 4, s, scale, zp, c.shape) + \\
        s.tobytes()


def context(c):
    return boardcodec.context_frame(tables, c, dtype, layout, scale, zp)


sizes = {}
for name in codecs:
    fn = {"raw": raw, "context": context}[name]
    mark()
    fn(codes[0])  # the board's first frame: builds the shape's plan (and imports and compiles numba, with it)
    mark()
    sizes[name] = [len(fn(codes[i % len(codes)])) for i in range(runs)]
    mark()
print(json.dumps(sizes))
'''


@dataclass(frozen=True)
class WireCost:
    """One codec's encode cost on one core: guest instructions per frame (steady state, and the first frame of a
    process), the frame bytes, and what was counted."""

    codec: str
    core: str  # qemu cpu, e.g. "cortex-a72"
    shape: tuple[int, int, int]  # C, H, W symbols
    instructions: float  # per frame, after the first
    first_frame: int  # the first frame's instructions (plan building included; with jit, numba's import and
    # compile, or its load from numba's cache)
    frame_bytes: float  # mean frame size of the counted frames
    frames: int  # frames counted
    source_sha256: str  # the boardcodec.py counted
    jit: bool = False  # counted with numba importable (boardcodec's compiled encoder)

    def to_dict(self) -> dict:
        return asdict(self)


def source_hash(source: Path | None = None) -> str:
    return hashlib.sha256(Path(source or boardcodec.__file__).read_bytes()).hexdigest()


def count_codecs(sysroot: Sysroot, core: Core, tables: Mapping[str, np.ndarray], sym: np.ndarray,
                 codecs: Sequence[str] = BOARD_CODECS, *, runs: int = 3, dtype: str = "int8",
                 source: Path | None = None, timeout: float = 1800, jit: bool = False,
                 numba_cache: Path | None = None) -> dict[str, WireCost]:
    """Count (no cache) the board's encoder ``source`` (default: this bottlefit's boardcodec.py) per codec on
    ``core``, on frames ``sym`` (N, C, H, W) uint8 symbols of a ``dtype`` contract (the head's codes are the symbols
    shifted back) with the context ``tables`` (boardcodec.load's dict). Frame ``i`` of the counted run is
    ``sym[i % N]``; frame 0 is also the warm-up. ``jit``: with numba (:data:`JIT_WHEELS`) on the guest's path,
    so boardcodec encodes with its compiled kernels; ``numba_cache``: a kept folder the source is copied into
    (only when its bytes changed, so numba's cache in its ``__pycache__`` stays valid) instead of a new one each
    call: the first call's first frame compiles, a later call's loads the compiled code, as a board's second
    process does."""
    from bottlefit.emulation import cost

    unknown = [c for c in codecs if c not in BOARD_CODECS]
    if unknown:
        raise ValueError(f"codec(s) {', '.join(unknown)}: the board encodes {', '.join(BOARD_CODECS)}")
    sym = np.asarray(sym, dtype=np.uint8)
    if sym.ndim == 3:
        sym = sym[None]
    src = Path(source or boardcodec.__file__)
    with tempfile.TemporaryDirectory(prefix="bottlefit-wirecost-") as d:
        tmp = Path(d)
        lib = tmp / "lib" if numba_cache is None else Path(numba_cache)
        lib.mkdir(parents=True, exist_ok=True)
        if not (lib / "boardcodec.py").is_file() or (lib / "boardcodec.py").read_bytes() != src.read_bytes():
            shutil.copyfile(src, lib / "boardcodec.py")  # alone on the path, as in a board bundle
        np.savez(tmp / "tables.npz", contract_id=np.array(str(tables.get("contract_id", "0" * 12))),
                 marginal_counts=np.asarray(tables.get("marginal_counts", np.zeros((sym.shape[1], 256))),
                                            dtype=np.int64),
                 **{k: np.asarray(tables[k], dtype=np.int64) for k in boardcodec.TABLE_KEYS})
        np.save(tmp / "sym.npy", sym)
        c = cost.count_guest_script(sysroot, core, GUEST.replace("@MARK_FD@", str(cost.MARK_FD)),
                                    [str(tmp / "tables.npz"), str(tmp / "sym.npy"), ",".join(codecs), str(runs),
                                     dtype],
                                    extra_site=[lib, *([cost.ensure_overlay(JIT_WHEELS)] if jit else [])],
                                    timeout=timeout, name="boardcodec")
        spans = cost.spans(c)
        if len(c.marks) != 3 * len(codecs):
            raise RuntimeError(f"the guest set {len(c.marks)} marks, expected {3 * len(codecs)}")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    shape = tuple(int(v) for v in sym.shape[1:])
    out = {}
    for i, codec in enumerate(codecs):
        first, steady = spans[3 * i], spans[3 * i + 1]
        out[codec] = WireCost(codec, core.cpu, shape, steady / runs, first, _frame_bytes(codec, tables, sym, runs),
                              runs, sha, jit)
    return out


def _frame_bytes(codec: str, tables: Mapping[str, np.ndarray], sym: np.ndarray, runs: int) -> float:
    """Mean frame bytes of the counted frames (header + payload; the bytes do not depend on the encoder's speed)."""
    head = boardcodec.HEADER.size + 2 * 3
    if codec == "raw":
        return float(head + sym[0].size)
    return float(np.mean([head + len(boardcodec.encode(tables, sym[i % len(sym)])) for i in range(runs)]))


def encode_instructions(sysroot: Sysroot, core: Core, tables: Mapping[str, np.ndarray], sym: np.ndarray,
                        codecs: Sequence[str] = BOARD_CODECS, *, runs: int = 3, dtype: str = "int8",
                        jit: bool = False) -> dict[str, WireCost]:
    """Per codec, the board encoder's guest instructions per frame on ``core`` (:class:`WireCost`), from the cache
    when this codec, core, frame shape, boardcodec source, tables, sysroot and ``jit`` were counted before."""
    sym = np.asarray(sym, dtype=np.uint8)
    shape = tuple(int(v) for v in (sym.shape[1:] if sym.ndim == 4 else sym.shape))
    tid = boardcodec.table_id(np.asarray(tables.get("marginal_counts", np.zeros((shape[0], 256))), np.int64),
                              tables).hex()
    folder = cache_dir() / "board-codec-cost"
    sha = source_hash()
    out, missing = {}, []
    for codec in codecs:
        key = hashlib.sha256(json.dumps([codec, core.cpu, shape, sha, tid, sysroot.key, dtype, runs]
                                        + ([JIT_WHEELS] if jit else [])).encode()
                             ).hexdigest()[:16]
        path = folder / f"{codec}-{key}.json"
        if path.is_file():
            d = json.loads(path.read_text())
            out[codec] = WireCost(**{**d, "shape": tuple(d["shape"])})
        else:
            missing.append((codec, path))
    if missing:
        counted = count_codecs(sysroot, core, tables, sym, [c for c, _ in missing], runs=runs, dtype=dtype,
                               jit=jit)
        folder.mkdir(parents=True, exist_ok=True)
        for codec, path in missing:
            fd, tmp = tempfile.mkstemp(prefix=".wirecost-", dir=folder)
            with os.fdopen(fd, "w") as f:
                json.dump(counted[codec].to_dict(), f)
            os.replace(tmp, path)
            out[codec] = counted[codec]
    return {c: out[c] for c in codecs}


def export_encode_instructions(board: str, wire: str, codes: np.ndarray, export: Path, head: str | None = None,
                               jit: bool = False) -> float | None:
    """Guest instructions per frame of the board's ``wire`` encoder on ``board``'s core (pi4, pi5, pi3, zero2) for
    one image's ``codes`` of an export (``OUT``; ``head``: the contract's head, default the first quantized one),
    with the export's shipped tables; cached (:func:`encode_instructions`). None for a wire the board does not
    encode (zstd, entropy) or an export without a quantized contract. ``jit``: the steady state of the compiled
    encoder (numba on the guest). EmulationUnavailable where qemu or the sysroot is missing."""
    if wire not in BOARD_CODECS:
        return None
    from bottlefit.emulation.arm64 import ensure_sysroot, get_core
    from bottlefit.serve import codecs as wire_codecs
    from bottlefit.serve.contract import find_targets
    from bottlefit.serve.head import load_tables

    for target in find_targets(Path(export)):
        for contract in target.contracts:
            if contract.quantized and (head is None or contract.head == head):
                tables = {**load_tables(target, contract).arrays(), "contract_id": contract.contract_id}
                sym = wire_codecs.to_symbols(contract, np.asarray(codes))
                got = encode_instructions(ensure_sysroot(), get_core(board), tables, sym, [wire],
                                          dtype=str(contract.dtype), jit=jit)
                return got[wire].instructions
    return None
