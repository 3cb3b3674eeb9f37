"""The decode step of the Triton ensemble (python backend): a BYTES tensor of wire frames -> the float NCHW
bottleneck the tail takes, with the same decoder as ``bottlefit serve`` (:mod:`bottlefit.serve.boardcodec`).

``bottlefit triton`` copies this file verbatim to ``<model>_decode/1/model.py`` with ``boardcodec.py`` beside it,
the export's contracts in ``contracts.json`` and their codec tables in ``codec/<contract id>.npz``, so the Python
that Triton runs needs numpy, constriction and zstandard only (no bottlefit). Python >= 3.8.

A frame carries its codec and contract id in its header: a frame made for another export, another fitted model,
a damaged stream or a shape that is not the tail's is answered with a Triton error for that request (INVALID_ARG,
HTTP 400), and the model keeps serving.
"""

import json
import os
import sys

import numpy as np

try:
    from bottlefit.serve import boardcodec
except ImportError:  # inside Triton: the copy shipped beside this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import boardcodec

CONTRACTS = "contracts.json"
INPUT, OUTPUT = "bottleneck", "bottleneck_fp32"


class FrameDecoder:
    """The contracts of one export (``folder/contracts.json``) and their tables, loaded once each."""

    def __init__(self, folder):
        with open(os.path.join(folder, CONTRACTS)) as f:
            meta = json.load(f)
        self.folder = folder
        self.tail_shape = tuple(meta["tail_shape"])
        self.max_frames = int(meta["max_frames"])
        self.contracts = {c["contract_id"]: c for c in meta["contracts"]}
        self._tables = {}

    def tables(self, contract):
        cid = contract["contract_id"]
        if cid not in self._tables:
            if not contract.get("tables"):
                raise ValueError(f"contract {cid} has no codec tables here: send codec raw or zstd")
            t = boardcodec.load(os.path.join(self.folder, contract["tables"]))
            self._tables[cid] = (t, boardcodec.table_id(t["marginal_counts"], t), boardcodec.cumulative(t))
        return self._tables[cid]

    def decode(self, frame):
        """One frame -> (C, H, W) float32, exactly as the contract's affine maps the codes. ValueError if refused."""
        codec, dtype, cid, tid, crc, scale, zp, shape, end = boardcodec.parse_header(frame)
        c = self.contracts.get(cid)
        if c is None:
            known = ", ".join(f"{k} ({v['target']}/{v['head']})" for k, v in self.contracts.items())
            raise ValueError(f"payload made for contract {cid}, which this repository does not serve (it serves "
                             f"{known}): the head that sent it belongs to another export; deploy the matching export")
        boardcodec.check_frame(dtype, shape, scale, zp, c)
        tables = cum = None
        if codec in ("entropy", "context"):
            tables, have, cum = self.tables(c)
            if have != tid:
                raise ValueError(f"frame was coded with model table {tid.hex()}, this repository has {have.hex()} "
                                 f"for contract {cid}")
        chw = tuple(c["nchw_shape"])
        if chw != self.tail_shape:
            raise ValueError(f"contract shape {chw} is not the tail's {self.tail_shape}")
        sym = boardcodec.decode_symbols(codec, frame[end:], chw, tables, cum if codec == "context" else None)
        boardcodec.check_crc(codec, sym, crc)
        codes = sym.astype(np.int16) - (128 if dtype == "int8" else 0)  # the codes, C,H,W whatever the layout
        return (codes.astype(np.float32) - np.float32(c["zero_point"])) * np.float32(c["scale"])

    def decode_all(self, frames):
        """The elements of one request's BYTES tensor -> (N, C, H, W) float32."""
        frames = list(frames)
        if not 1 <= len(frames) <= self.max_frames:
            raise ValueError(f"{len(frames)} frames in one request; send 1..{self.max_frames}")
        out = []
        for i, f in enumerate(frames):
            try:
                out.append(self.decode(bytes(f)))
            except ValueError as e:
                raise ValueError(f"element {i}: {e}") from None
        return np.ascontiguousarray(np.stack(out), dtype=np.float32)


class TritonPythonModel:
    """Triton's python-backend entry points."""

    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.decoder = FrameDecoder(os.path.join(args["model_repository"], args["model_version"]))

    def execute(self, requests):
        pb = self.pb
        responses = []
        for request in requests:
            try:
                frames = pb.get_input_tensor_by_name(request, INPUT).as_numpy().reshape(-1)
                x = self.decoder.decode_all(frames)
                responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(OUTPUT, x)]))
            except Exception as e:  # noqa: BLE001 - a bad request fails itself, never the model
                responses.append(pb.InferenceResponse(
                    error=pb.TritonError(f"bottlefit decode: {e}", pb.TritonError.INVALID_ARG)))
        return responses
