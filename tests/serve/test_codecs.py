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
