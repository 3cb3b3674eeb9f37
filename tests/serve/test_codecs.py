from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bottlefit.serve import codecs
from bottlefit.serve.head import load_tables


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_round_trip_is_bit_exact(heldout_codes, codec: str) -> None:
    target, contract, codes = heldout_codes
    tables = load_tables(target, contract)
    for c in codes:
        frame = codecs.encode_frame(contract, c, codec, tables)
        got_contract, back = codecs.decode_frame(frame, {contract.contract_id: contract}, lambda _: tables)
        assert got_contract == contract
        assert back.dtype == c.dtype and np.array_equal(back, c)
        assert codecs.read_header(frame).codec == codec


def test_round_trip_extreme_codes_nhwc_int8(heldout_codes) -> None:
    """Symbols the calibration never saw, an int8 NHWC contract: still bit-exact."""
    target, contract, codes = heldout_codes
    c8 = dataclasses.replace(contract, dtype="int8", layout="NHWC", shape=(5, 5, 4), zero_point=-3)
    sym = codecs.to_symbols(contract, codes[0])
    tables = codecs.fit_tables(c8, sym[None])
    rng = np.random.default_rng(0)
    for q in (np.full((5, 5, 4), -128, np.int8), np.full((5, 5, 4), 127, np.int8),
              rng.integers(-128, 128, (5, 5, 4)).astype(np.int8)):
        for codec in codecs.CODECS:
            _, back = codecs.decode_frame(codecs.encode_frame(c8, q, codec, tables), {c8.contract_id: c8},
                                          lambda _, t=tables: t)
            assert np.array_equal(back, q), codec


def test_refuses_another_contract(heldout_codes) -> None:
    target, contract, codes = heldout_codes
    other = dataclasses.replace(contract, contract_id="0123456789ab")
    frame = codecs.encode_frame(other, codes[0], "zstd")
    with pytest.raises(codecs.CodecError, match="contract 0123456789ab.*another export"):
        codecs.decode_frame(frame, {contract.contract_id: contract})


def test_refuses_damage(heldout_codes) -> None:
    target, contract, codes = heldout_codes
    tables = load_tables(target, contract)
    known = {contract.contract_id: contract}
    for codec in codecs.CODECS:
        frame = bytearray(codecs.encode_frame(contract, codes[0], codec, tables))
        hdr = codecs.read_header(bytes(frame))
        for i in range(hdr.size, len(frame)):  # flip one payload byte: refused, never silently wrong
            frame[i] ^= 0x5A
        with pytest.raises(codecs.CodecError):
            codecs.decode_frame(bytes(frame), known, lambda _: tables)
        with pytest.raises(codecs.CodecError):
            codecs.decode_frame(bytes(frame[:10]), known, lambda _: tables)
    other = dataclasses.replace(tables, marginal_counts=tables.marginal_counts + 1)
    frame = codecs.encode_frame(contract, codes[0], "entropy", other)
    with pytest.raises(codecs.CodecError, match="model table"):
        codecs.decode_frame(frame, known, lambda _: tables)


def test_coders_beat_raw_and_track_entropy(heldout_codes) -> None:
    target, contract, codes = heldout_codes
    tables = load_tables(target, contract)
    sym = np.stack([codecs.to_symbols(contract, c) for c in codes])
    hdr = codecs.read_header(codecs.encode_frame(contract, codes[0], "raw")).size
    size = {k: np.mean([len(codecs.encode_frame(contract, c, k, tables)) - hdr for c in codes]) for k in codecs.CODECS}
    assert size["raw"] == codes[0].size
    assert size["entropy"] < size["raw"] and size["context"] < size["raw"]
    assert size["entropy"] < 1.6 * codecs.entropy_bits(sym) / 8 / len(sym) + 8


def test_tables_ship_with_the_export(heldout_codes) -> None:
    """The export writes codec/<contract id>.npz (hashed in the manifest; bytes reproducible) and load_tables
    reads that file: a refit on the same calibration codes gives the same bytes."""
    from bottlefit.serve.head import calibration_symbols

    target, contract, _ = heldout_codes
    rel = f"codec/{contract.contract_id}.npz"
    art = next(a for a in target.artifacts if a.file == rel)
    tables = load_tables(target, contract)
    assert art.role == "aux" and art.extra["codec_tables"]["table_id"] == tables.table_id.hex()
    assert (target.path / rel).read_bytes() == tables.to_bytes()
    refit = codecs.fit_tables(contract, calibration_symbols(target, contract))
    assert refit.to_bytes() == tables.to_bytes()


def test_board_encoder_writes_what_constriction_writes() -> None:
    """The board's pure-Python rANS encoder against constriction's own AnsCoder on the same integer frequencies
    (random tables with zeros, long and short messages): the same 32-bit words, so the server's constriction
    decoder reads the board's stream."""
    import constriction

    from bottlefit.serve import boardcodec

    rng = np.random.default_rng(0)
    family = constriction.stream.model.Categorical(perfect=False)
    for n in (1, 7, 3000):
        p = rng.dirichlet(np.full(256, 0.05), size=n)
        f = np.floor(p * boardcodec.TOTAL).astype(np.int64)
        f[np.arange(n), f.argmax(axis=1)] += boardcodec.TOTAL - f.sum(axis=1)  # rows sum to TOTAL exactly
        s = np.array([rng.choice(256, p=row / row.sum()) for row in f])
        left = np.cumsum(f, axis=1)[np.arange(n), s] - f[np.arange(n), s]
        ours = boardcodec.ans_encode(left + s, f[np.arange(n), s] + 1)
        enc = constriction.stream.stack.AnsCoder()
        enc.encode_reverse(s.astype(np.int32), family, f.astype(np.float64))
        assert ours == enc.get_compressed().astype("<u4").tobytes()
        dec = constriction.stream.stack.AnsCoder(np.frombuffer(ours, dtype="<u4").astype(np.uint32))
        assert np.array_equal(dec.decode(family, f.astype(np.float64)), s)


def _synthetic_tables(c: int, seed: int) -> dict[str, np.ndarray]:
    """Context-model tables from integer draws only (no float fit): the same arrays on every machine."""
    from bottlefit.serve import boardcodec as bc

    rng = np.random.default_rng(seed)
    w = rng.integers(-600, 600, (c, bc.N_GRAD, bc.n_features(c - 1)))
    w[:, :, :2] += 1 << (bc.FRAC - 1)  # mostly left + up
    z = rng.integers(0, 50, (c, bc.N_NEAR, bc.N_ZERO, bc.N_ZERO_ENERGY, 2))
    z[..., 1] += z[..., 0]
    return {"zero_symbol": np.array(128), "fill": rng.integers(100, 160, c),
            "grad_edges": np.sort(rng.integers(0, 60, (c, bc.N_GRAD - 1)), axis=1), "weights": w,
            "energy_edges": np.sort(rng.integers(0, 200, (c, bc.N_ENERGY - 1)), axis=1),
            "residual": rng.integers(1, 1 << 14, (c, bc.N_ENERGY, bc.N_NEAR, 511)), "zero": z}


def _synthetic_symbols(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = 128 + np.cumsum(rng.integers(-3, 4, shape), axis=2) + rng.integers(-2, 3, shape)
    s[rng.random(shape) < 0.3] = 128  # the zero point's spike
    s[rng.random(shape) < 0.02] = 0
    s[rng.random(shape) < 0.02] = 255
    return np.clip(s, 0, 255).astype(np.uint8)


_SHAPES = ((5, 9, 11), (3, 1, 6), (4, 7, 1), (12, 8, 8))


def test_context_stream_is_pinned() -> None:
    """The context codec's bytes for fixed integer tables and symbols, as the first encoder (before the batched
    model) wrote them: frames already sent by boards must keep decoding, so the format never changes silently.
    The server's decoder reads every stream back."""
    import hashlib

    from bottlefit.serve import boardcodec

    digest = hashlib.sha256()
    for i, shape in enumerate(_SHAPES):
        tables, sym = _synthetic_tables(shape[0], i), _synthetic_symbols(shape, 100 + i)
        payload = boardcodec.encode(tables, sym)
        digest.update(payload)
        ct = codecs.CodecTables("0" * 12, np.zeros((shape[0], 256), np.int64), tables)
        assert np.array_equal(codecs._decode_payload("context", payload, shape, ct), sym)
    assert digest.hexdigest() == "ed7d7e4820e9eb9b64528f3f2cf247f4ca6e0d84e72cff979a02e8cb83beb635"


def test_batched_model_is_the_per_channel_model() -> None:
    """The batched model (every channel of a run of symbols at once) gives the same predictions and context rows
    as the per-channel functions the tables are fitted with."""
    from bottlefit.serve import boardcodec as bc

    for i, shape in enumerate(_SHAPES):
        tables, sym = _synthetic_tables(shape[0], i), _synthetic_symbols(shape, 100 + i)
        c_count, h, w = shape
        flat = sym.reshape(c_count, -1).astype(np.int64)
        nb = bc.Neighbourhood(h, w, *np.divmod(np.arange(h * w), w))
        pred = np.stack([bc.prediction(tables, flat, c, nb) for c in range(c_count)])
        res = flat - pred
        ks, zks = zip(*(bc.contexts(tables, flat, res, c, nb, pred[c]) for c in range(c_count)), strict=True)
        bm = bc.Batched(tables, bc.plan(c_count, h, w))
        buf, ares = bm.buffers()
        buf[: sym.size] = flat.ravel()
        p = bm.predict(buf, 0, bm.plan.n)
        ares[bm.plan.flat] = np.abs(buf[bm.plan.flat] - p)
        k, zk = bm.contexts(buf, ares, p, 0, bm.plan.n)
        at = bm.plan.flat
        assert np.array_equal(p, pred.ravel()[at])
        assert np.array_equal(k, np.concatenate(ks)[at]) and np.array_equal(zk, np.concatenate(zks)[at])
