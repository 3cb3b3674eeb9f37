"""The board's context encoder without stepping (bottlefit.serve.boardcodec.prepare / quantized_all /
image_model) against the stepped encoder it replaced, kept here as the oracle: the same bytes on real R152 v2
frames, synthetic frames and edge cases (all zero point, saturated, checkerboard, random, tiny and odd shapes,
extreme weights); decode(encode(x)) round trips; and the count of the board's encoders under emulation on a tiny
frame (skipped, with EmulationUnavailable's line, where qemu or the sysroot is missing). The compiled encoder
(numba, optional: the ``board`` extra) is held to the same oracle on the same cases, on this host and, slow, on
the emulated Pi 4 core."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bottlefit.serve import boardcodec as bc
from tests.serve.test_codecs import _synthetic_symbols, _synthetic_tables

FRAMES = Path(__file__).resolve().parents[2] / "bench" / "results" / "board_codec" / "frames_r152v2_12.npz"


def _stepped(tables, sym) -> bytes:
    """The encoder before the vectorised one: one Adaptive update per step, the rANS loop as first written."""
    sym = np.asarray(sym, dtype=np.int64)
    bm = bc.Batched(tables, bc.plan(*sym.shape))
    pl = bm.plan
    buf, ares = bm.buffers()
    buf[: sym.size] = sym.reshape(-1)
    p = bm.predict(buf, 0, pl.n)
    s = buf[pl.flat]
    ares[pl.flat] = np.abs(s - p)
    k, zk = bm.contexts(buf, ares, p, 0, pl.n)
    left, freq = np.zeros_like(s), np.zeros_like(s)
    model = bc.Adaptive(tables)
    for a, b in zip(pl.bounds[:-1], pl.bounds[1:], strict=True):
        left[a:b], freq[a:b] = bc.quantized(tables, model, k[a:b], p[a:b], zk[a:b], s[a:b])
        model.update(k[a:b], p[a:b], s[a:b])
    starts, freqs = (left + s).tolist(), (freq + 1).tolist()
    words, x = [], 0
    for i in range(len(freqs) - 1, -1, -1):
        if (x >> (64 - bc.PRECISION)) >= freqs[i]:
            words.append(x & 0xFFFFFFFF)
            x >>= 32
        x = ((x // freqs[i]) << bc.PRECISION) | (starts[i] + x % freqs[i])
    while x:
        words.append(x & 0xFFFFFFFF)
        x >>= 32
    return np.array(words, dtype="<u4").tobytes()


def _real() -> tuple[dict, np.ndarray]:
    with np.load(FRAMES, allow_pickle=False) as z:
        return {k: np.asarray(z[k], dtype=np.int64) for k in bc.TABLE_KEYS}, np.asarray(z["symbols"], np.uint8)


def _cases():
    """(name, tables, symbols (C, H, W) uint8)."""
    rng = np.random.default_rng(7)
    for i, shape in enumerate(((1, 1, 1), (1, 1, 5), (1, 4, 1), (2, 2, 2), (3, 1, 6), (4, 7, 1), (5, 9, 11),
                               (12, 8, 8), (7, 3, 13))):
        t = _synthetic_tables(shape[0], 10 + i)
        z = int(t["zero_symbol"])
        yield f"spiky{shape}", t, _synthetic_symbols(shape, 200 + i)
        yield f"uniform{shape}", t, rng.integers(0, 256, shape).astype(np.uint8)
        yield f"zero-point{shape}", t, np.full(shape, z, np.uint8)
        yield f"zeros{shape}", t, np.zeros(shape, np.uint8)
        yield f"saturated{shape}", t, np.full(shape, 255, np.uint8)
        yield f"checker{shape}", t, (255 * (np.indices(shape).sum(axis=0) % 2)).astype(np.uint8)
    t = _synthetic_tables(6, 99)  # the fit's extreme weights: |w| = 4096 * 2**FRAC, sums far from the clamp
    t["weights"] = np.where(np.random.default_rng(1).random(t["weights"].shape) < 0.5, -1, 1) * (4096 << bc.FRAC)
    yield "extreme-weights", t, np.random.default_rng(2).integers(0, 256, (6, 10, 9)).astype(np.uint8)
    tables, sym = _real()
    for i in (0, 7, 20):
        yield f"r152v2_12 held-out {i}", tables, sym[i]


CASES = list(_cases())


def _numba() -> None:
    if bc._kernels() is None:
        pytest.skip("numba is not importable here (pip install bottlefit[board]), or BOARDCODEC_JIT=0")


@pytest.mark.parametrize("name,tables,sym", CASES, ids=[c[0] for c in CASES])
def test_same_bytes_as_the_stepped_encoder(name, tables, sym) -> None:
    assert bc.encode(dict(tables), sym, jit=False) == _stepped(dict(tables), sym)


@pytest.mark.parametrize("name,tables,sym", CASES, ids=[c[0] for c in CASES])
def test_compiled_encoder_same_bytes(name, tables, sym) -> None:
    """numba's kernels (this host's compile) against the same oracle."""
    _numba()
    assert bc.encode(dict(tables), sym, jit=True) == _stepped(dict(tables), sym)


def test_compiled_encoder_is_the_default_when_importable(monkeypatch) -> None:
    """encode() picks the kernels when numba imports, the numpy path with BOARDCODEC_JIT=0; jit=True without numba
    is an error, not a silent fallback."""
    _numba()
    tables, sym = _real()
    calls = []
    monkeypatch.setattr(bc, "_encode_compiled", lambda *a: calls.append(1) or b"")
    bc.encode(dict(tables), sym[0])
    assert calls == [1]
    monkeypatch.setattr(bc, "_KERNELS", [None])  # what _kernels() leaves without numba / with BOARDCODEC_JIT=0
    assert bc.encode(dict(tables), sym[0]) == _stepped(dict(tables), sym[0]) and calls == [1]
    with pytest.raises(RuntimeError, match="needs numba"):
        bc.encode(dict(tables), sym[0], jit=True)


def test_many_real_frames_and_reused_tables() -> None:
    """Every saved R152 v2 frame, one tables dict for all (what a board does: derived tables cached in it)."""
    tables, sym = _real()
    shared = dict(tables)
    for s in sym:
        want = _stepped(dict(tables), s)
        assert bc.encode(shared, s, jit=False) == want
        if bc._kernels() is not None:
            assert bc.encode(shared, s, jit=True) == want
    assert {"_cumulative"} <= set(shared)


ROUND_TRIP = [c for c in CASES if c[0].endswith("(5, 9, 11)") or c[0] == "extreme-weights"]


@pytest.mark.parametrize("name,tables,sym", ROUND_TRIP, ids=[c[0] for c in ROUND_TRIP])
def test_round_trip(name, tables, sym) -> None:
    payload = bc.encode(dict(tables), sym)
    assert np.array_equal(bc.decode_symbols("context", payload, sym.shape, dict(tables)), sym)


def test_round_trip_real_frame() -> None:
    tables, sym = _real()
    payload = bc.encode(dict(tables), sym[5])
    assert len(payload) < sym[5].size  # the context codec codes a real bottleneck below 8 bits a symbol
    assert np.array_equal(bc.decode_symbols("context", payload, sym[5].shape, dict(tables)), sym[5])


def test_context_frame_table_id_is_cached_and_right() -> None:
    tables, sym = _real()
    t = dict(tables, marginal_counts=np.ones((sym.shape[1], 256), np.int64), contract_id="0123456789ab")
    codes = (sym[0].astype(np.int16) - 128).astype(np.int8)
    a = bc.context_frame(t, codes, "int8", "NCHW", 0.5, 0)
    assert t["_table_id"] == bc.table_id(t["marginal_counts"], t)
    assert bc.context_frame(t, codes, "int8", "NCHW", 0.5, 0) == a
    assert bc.parse_header(a)[3] == bc.table_id(t["marginal_counts"], t)


@pytest.fixture(scope="module")
def sysroot():
    from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot
    from bottlefit.emulation.cost import ensure_plugin

    try:
        root = ensure_sysroot()
        ensure_plugin()
    except EmulationUnavailable as e:
        pytest.skip(str(e))
    return root


def test_count_board_encoders_on_a_tiny_frame(sysroot) -> None:
    """Guest instructions per frame of raw and context on the emulated Pi 4 core: both counted, context above raw
    (it models and codes every symbol), the first frame above the steady state (it builds the plan)."""
    from bottlefit.emulation.arm64 import get_core
    from bottlefit.serve import wirecost

    shape = (3, 4, 5)
    tables = _synthetic_tables(shape[0], 3)
    sym = np.stack([_synthetic_symbols(shape, 4), _synthetic_symbols(shape, 5)])
    got = wirecost.count_codecs(sysroot, get_core("pi4"), tables, sym, runs=2)
    assert set(got) == {"raw", "context"}
    raw, ctx = got["raw"], got["context"]
    assert raw.core == "cortex-a72" and raw.shape == shape and raw.frames == 2
    assert raw.frame_bytes == bc.HEADER.size + 6 + 60
    assert ctx.frame_bytes == bc.HEADER.size + 6 + np.mean([len(bc.encode(dict(tables), s)) for s in sym])
    assert 1e4 < raw.instructions < ctx.instructions < 2e8
    assert ctx.first_frame > ctx.instructions
    assert ctx.source_sha256 == wirecost.source_hash()


def test_encode_instructions_is_cached(sysroot, monkeypatch) -> None:
    """The second ask for the same codec, core, shape, source and tables is answered from the cache: no guest."""
    from bottlefit.emulation.arm64 import get_core
    from bottlefit.serve import wirecost

    shape = (2, 3, 3)
    tables = _synthetic_tables(shape[0], 8)
    sym = _synthetic_symbols(shape, 9)
    first = wirecost.encode_instructions(sysroot, get_core("pi4"), tables, sym, ["context"], runs=1)

    def no_guest(*a, **k):
        raise AssertionError("counted again")

    monkeypatch.setattr(wirecost, "count_codecs", no_guest)
    again = wirecost.encode_instructions(sysroot, get_core("pi4"), tables, sym, ["context"], runs=1)
    assert again == first and again["context"].shape == shape and again["context"].instructions > 0


def test_order_is_the_wavefront_loop() -> None:
    """The vectorised coding order against the loop it replaced (steps, then channels, one wavefront each)."""
    for shape in ((1, 1, 1), (1, 1, 5), (1, 4, 1), (3, 1, 6), (4, 7, 1), (5, 9, 11), (12, 29, 29)):
        c_count, h, w = shape
        cs, hs, ws = [], [], []
        for t in range(bc.steps(c_count, h, w)):
            for c in range(c_count):
                rows, cols = bc.wavefront(h, w, t - bc.LAG * c)
                cs.append(np.full(rows.size, c))
                hs.append(rows)
                ws.append(cols)
        got = bc.order(*shape)
        assert all(np.array_equal(a, np.concatenate(b)) for a, b in zip(got, (cs, hs, ws), strict=True)), shape
        flat, bounds = bc.coding_order(*shape)
        assert np.array_equal(np.sort(flat), np.arange(c_count * h * w)) and bounds[-1] == flat.size


def test_export_encode_instructions(sysroot, heldout_codes, mini_export) -> None:
    """What bench split asks: the count for one image's codes of an export, by wire; None for server-side wires."""
    from bottlefit.serve import wirecost

    _, contract, codes = heldout_codes
    ctx = wirecost.export_encode_instructions("pi4", "context", codes[0], mini_export, contract.head)
    assert ctx is not None and 1e5 < ctx < 1e9
    assert wirecost.export_encode_instructions("pi4", "zstd", codes[0], mini_export) is None
    assert wirecost.export_encode_instructions("pi4", "context", codes[0], mini_export, "no-such-head") is None


JIT_GUEST = """\
import hashlib
import sys

import numpy as np

import boardcodec as bc

t = bc.load(sys.argv[1])
sym = np.load(sys.argv[2])
for s in sym:
    print(hashlib.sha256(bc.encode(t, s, jit=True)).hexdigest(), hashlib.sha256(bc.encode(t, s, jit=False)).hexdigest())
"""


@pytest.mark.slow
def test_compiled_encoder_on_the_emulated_pi4(sysroot, tmp_path) -> None:
    """numba's aarch64 wheels on the Pi 4 core (qemu): the kernels compile there and write the oracle's bytes; the
    counted steady state is below the numpy path's, the first frame (numba's import and compile) far above it.
    A few minutes under qemu (LLVM compiles the kernels in the guest, three times)."""
    import hashlib

    from bottlefit.emulation import cost
    from bottlefit.emulation.arm64 import EmulationUnavailable, get_core, run_python
    from bottlefit.serve import wirecost

    shape = (6, 10, 9)
    tables = dict(_synthetic_tables(shape[0], 21), marginal_counts=np.ones((shape[0], 256), np.int64),
                  contract_id="0123456789ab")
    sym = np.stack([_synthetic_symbols(shape, 22), _synthetic_symbols(shape, 23)])
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "boardcodec.py").write_bytes(Path(bc.__file__).read_bytes())
    np.savez(tmp_path / "t.npz", contract_id=np.array(tables["contract_id"]), marginal_counts=tables["marginal_counts"],
             **{k: tables[k] for k in bc.TABLE_KEYS})
    np.save(tmp_path / "s.npy", sym)
    script = tmp_path / "guest.py"
    script.write_text(JIT_GUEST)
    try:
        overlay = cost.ensure_overlay(wirecost.JIT_WHEELS)
    except EmulationUnavailable as e:  # no network for the wheels
        pytest.skip(str(e))
    proc = run_python(sysroot, get_core("pi4"), script, [tmp_path / "t.npz", tmp_path / "s.npy"],
                      env={"PYTHONPATH": f"{lib}:{overlay}:{sysroot.site}"}, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = [hashlib.sha256(_stepped(dict(tables), s)).hexdigest() for s in sym]
    assert [line.split() for line in proc.stdout.splitlines() if line] == [[h, h] for h in want]
    core = get_core("pi4")
    jit = wirecost.count_codecs(sysroot, core, tables, sym, ["context"], runs=2, jit=True)["context"]
    pure = wirecost.count_codecs(sysroot, core, tables, sym, ["context"], runs=2)["context"]
    assert jit.jit and not pure.jit and jit.frame_bytes == pure.frame_bytes
    assert jit.instructions < pure.instructions
    assert jit.first_frame > 100 * pure.first_frame
