"""A head artifact run in its runtime to a contract's codes, and the codec tables fitted on its calibration codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.errors import UserError
from bottlefit.exporter import wire
from bottlefit.files import user_cache_dir
from bottlefit.runtimes import get_runner
from bottlefit.serve.codecs import CodecError, CodecTables, fit_tables, to_symbols
from bottlefit.serve.contract import TargetExport, WireContract

TABLES_FORMAT = "ctx2"  # the cache's file names change with the tables' format
CODEC_DIR = "codec"


def codec_path(contract_id: str) -> str:
    """Where an export keeps a contract's tables, relative to its target directory."""
    return f"{CODEC_DIR}/{contract_id}.npz"


def head_codes(runner: Any, artifact: Any, contract: WireContract, x: np.ndarray) -> np.ndarray:
    """``artifact`` loaded in ``runner``: (N, 3, H, W) float32 -> (N, *contract.shape) codes, one image at a time
    (or floats for a float head)."""
    ispec, ospec = artifact.inputs[0], artifact.outputs[0]
    out = []
    for i in range(x.shape[0]):
        res = runner.infer({ispec.name: wire.encode(ispec, x[i : i + 1])})
        out.append(contract.codes(res[ospec.name]))
    return np.stack(out)


class HeadCodes:
    """One head artifact loaded in its runtime: float NCHW images -> the contract's codes, one image at a time."""

    def __init__(self, target: TargetExport, contract: WireContract, **runner_options: Any) -> None:
        self.target, self.contract = target, contract
        self.artifact = target.artifact(contract.head)
        self.runner = get_runner(self.artifact.runtime, target.path / self.artifact.file, **runner_options)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, *contract.shape) codes (or floats for a float head)."""
        return head_codes(self.runner, self.artifact, self.contract, x)

    @property
    def last_ms(self) -> float:
        return float(self.runner.last_inference_ms or 0.0)


def calibration_symbols(target: TargetExport, contract: WireContract, part: str = "calibration") -> np.ndarray:
    """The contract's symbols (N, C, H, W uint8) on the built-in ``part`` images, under the head's reference
    semantics (the same codes on any host)."""
    from bottlefit.calibration.builtin import builtin_arrays

    images, _ = builtin_arrays(target.card, part)
    codes = HeadCodes(target, contract, reference=True)(np.asarray(images, dtype=np.float32))
    return np.stack([to_symbols(contract, c) for c in codes])


def cache_dir() -> Path:
    """Codec tables fitted here, keyed by contract id (content-addressed: safe to share between runs)."""
    return user_cache_dir() / "codecs"


def load_tables(target: TargetExport, contract: WireContract) -> CodecTables:
    """The contract's codec tables: shipped with the export (``codec/<contract id>.npz``, written by ``bottlefit
    export`` and hashed in its manifest), else (an export made before the tables shipped) cached here, else fitted
    now on the built-in calibration photos and cached."""
    shipped = target.path / codec_path(contract.contract_id)
    if shipped.is_file():
        t = CodecTables.load(shipped)
        if t.contract_id != contract.contract_id:
            raise UserError(f"{shipped}: tables of contract {t.contract_id}, not {contract.contract_id}; re-export")
        return t
    cached = cache_dir() / f"{contract.contract_id}.{TABLES_FORMAT}.npz"
    if cached.is_file():
        try:
            t = CodecTables.load(cached)
            if t.contract_id == contract.contract_id:
                return t
        except CodecError:
            pass  # an older format in the cache: fit again
    tables = fit_tables(contract, calibration_symbols(target, contract))
    try:
        tables.save(cached)
    except OSError:
        pass
    return tables
