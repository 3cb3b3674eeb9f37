"""What an export writes for split serving, beside its artifacts: the codec tables of every int8 head
(``codec/<contract id>.npz``, fitted on the export's own calibration images) and, where the export has the ONNX
tail, a Triton model repository of the split tail (``triton/``, :mod:`bottlefit.serve.triton`). Every file is
returned as an aux :class:`Artifact`, so the manifest hashes it and ``bottlefit serve`` refuses a changed one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.exporter.artifact import Artifact, Precision, Role, Runtime
from bottlefit.files import sha256_file
from bottlefit.models.card import ModelCard
from bottlefit.runtimes import get_runner
from bottlefit.serve import codecs
from bottlefit.serve.contract import head_contract, tail_model_name
from bottlefit.serve.head import codec_path, head_codes

TRITON_DIR = "triton"
# a board bundle's shared files (write_board_bundle)
CLIENT, CLIENT_CONFIG, HEAD_MODULE, README = "client.py", "client.json", "boardhead.py", "README.md"
# the one board client and the modules it ships with (copied verbatim: the package never imports the client)
BOARD_CLIENT = Path(__file__).with_name("boardclient.py")
BOARD_MODULES = (BOARD_CLIENT.with_name("boardhttp.py"), BOARD_CLIENT.with_name("boardcodec.py"))


def head_symbols(out_dir: Path, art: Artifact, contract: Any, images: np.ndarray) -> np.ndarray:
    """The head's symbols (N, C, H, W) on ``images`` under its reference semantics (the same on any host)."""
    runner = get_runner(art.runtime, out_dir / art.file, reference=True)
    return np.stack([codecs.to_symbols(contract, c) for c in head_codes(runner, art, contract, images)])


def write_codec_tables(out_dir: Path, target: str, card: ModelCard, artifacts: list[Artifact],
                       images: np.ndarray, log: Callable[[str], None] = lambda m: None) -> list[Artifact]:
    """``codec/<contract id>.npz`` for each int8 head in ``artifacts`` (already written under ``out_dir``)."""
    out = []
    for art in artifacts:
        if art.role != Role.HEAD or art.precision != Precision.INT8 or not art.outputs:
            continue
        art.sha256 = sha256_file(out_dir / art.file)  # the contract id binds the tables to these bytes
        contract = head_contract(target, card, art)
        if contract is None or not contract.quantized:
            continue
        sym = head_symbols(out_dir, art, contract, np.ascontiguousarray(images, dtype=np.float32))
        tables = codecs.fit_tables(contract, sym)
        rel = codec_path(contract.contract_id)
        tables.save(out_dir / rel)
        log(f"{target}: codec tables for {art.file} (contract {contract.contract_id}, fitted on {len(sym)} "
            f"calibration images) -> {rel}")
        out.append(Artifact(rel, Role.AUX, Runtime.NONE, Precision.INT8, parity=False,
                            extra={"codec_tables": {"head": art.file, "contract_id": contract.contract_id,
                                                    "table_id": tables.table_id.hex(), "images": len(sym)}}))
    return out


def write_triton(out_dir: Path, target: str, card: ModelCard, tail: Artifact,
                 heads: list[Artifact] | None = None, max_batch_size: int = 16,
                 log: Callable[[str], None] = lambda m: None) -> list[Artifact]:
    """``triton/``: the split repository (ensemble, decode step, FP32 tail) for the ONNX tail ``tail`` and the int8
    heads among ``heads`` (already written under ``out_dir`` with their codec tables), or the FP32 tail alone when
    no head is int8."""
    from bottlefit.serve.codecs import CodecTables
    from bottlefit.serve.triton import (
        FP32_SUFFIX,
        RepositoryOptions,
        SplitContract,
        write_repository,
        write_split_repository,
    )

    name = tail_model_name(card)
    repo = out_dir / TRITON_DIR
    options = RepositoryOptions(max_batch_size=max_batch_size)
    contracts = []
    for art in heads or []:
        if art.role == Role.HEAD and art.precision == Precision.INT8 and art.outputs:
            art.sha256 = sha256_file(out_dir / art.file)
            c = head_contract(target, card, art)  # the target's name, not the build's tmp dir
            tables = out_dir / codec_path(c.contract_id) if c is not None else None
            if c is not None and c.quantized and tables is not None and tables.is_file():
                contracts.append(SplitContract(c, CodecTables.load(tables).to_bytes()))
    if contracts:
        files = write_split_repository(repo, name, out_dir / tail.file, tail, contracts, options)
        log(f"Triton model repository: {TRITON_DIR}/{name}/ (the split tail as an ensemble taking the wire frames), "
            f"{name}{FP32_SUFFIX}/ (the FP32 tail); point tritonserver --model-repository at {TRITON_DIR}/")
    else:
        model_dir, _ = write_repository(out_dir / tail.file, tail, repo, name + FP32_SUFFIX, options)
        files = [model_dir / "config.pbtxt", model_dir / "1" / "model.onnx"]
        log(f"Triton model repository for the FP32 tail: {TRITON_DIR}/{name}{FP32_SUFFIX}/ (no int8 head: no wire "
            "frames to decode)")
    return [Artifact(p.relative_to(out_dir).as_posix(), Role.AUX, Runtime.NONE, Precision.FP32, parity=False)
            for p in files if p.is_file()]


@dataclass(frozen=True)
class BoardBundle:
    """What one board's bundle ships beside its heads. The shared part is the same for every board: ``client.py``
    (:mod:`bottlefit.serve.boardclient`), its transport ``boardhttp.py`` and coder ``boardcodec.py``, and
    ``client.json``; the board's own part is ``head_module`` (shipped as ``boardhead.py``: which runtime produces
    the bottleneck) and its ``scripts``, copied verbatim."""

    folder: str  # the bundle's folder relative to the target's ("" = the target folder itself)
    head_module: Path
    scripts: tuple[Path, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)  # the board's own client.json keys (paths: bundle-relative)
    precision: Precision = Precision.INT8  # what the manifest records for the README (the bundle's engine precision)


def client_config(target: str, card: ModelCard, heads: list[Artifact], tables: list[Artifact], up: str,
                  extra: dict[str, Any]) -> dict[str, Any]:
    """client.json: the tail's name and input on the server and the wire contract of every head that has codec
    tables, with file paths relative to the bundle folder (``up``: the way from there to the target folder)."""
    by_head = {t.extra["codec_tables"]["head"]: t.file for t in tables}
    wires = []
    for art in heads:
        contract = head_contract(target, card, art)
        if art.file not in by_head or contract is None:
            continue
        wires.append({"head": up + art.file, "runtime": str(art.runtime),
                      "input": art.inputs[0].name if art.inputs else "input", "contract_id": contract.contract_id,
                      "dtype": contract.dtype, "shape": list(contract.shape), "layout": contract.layout,
                      "scale": contract.scale, "zero_point": contract.zero_point,
                      "head_outputs_codes": contract.head_outputs_codes, "codec_tables": up + by_head[art.file]})
    return {"format": "bottlefit-client", "format_version": 2, "tail_model": tail_model_name(card),
            "tail_input": "bottleneck", "heads": wires, **extra}


def write_board_bundle(out_dir: Path, target: str, card: ModelCard, bundle: BoardBundle,
                       heads: list[Artifact], tables: list[Artifact],
                       readme: Callable[[list[str]], str]) -> list[Artifact]:
    """A board's bundle under ``out_dir/bundle.folder``: the board client and its modules, the board's scripts,
    ``client.json`` for ``heads`` (already written, their codec ``tables`` too) and ``README.md``, the text
    ``readme`` gives for the other files written here (relative to ``out_dir``). Returns the files as aux
    artifacts, relative to ``out_dir``."""
    import json
    import shutil

    folder = out_dir / bundle.folder
    folder.mkdir(parents=True, exist_ok=True)
    copies = {CLIENT: BOARD_CLIENT, HEAD_MODULE: bundle.head_module, **{m.name: m for m in BOARD_MODULES},
              **{s.name: s for s in bundle.scripts}}
    for name, src in copies.items():
        shutil.copyfile(src, folder / name)
    for art in heads:  # the contract id binds the client's payloads to these bytes
        art.sha256 = art.sha256 or sha256_file(out_dir / art.file)
    up = "../" * len(Path(bundle.folder).parts)
    config = client_config(target, card, heads, tables, up, bundle.config)
    (folder / CLIENT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    prefix = bundle.folder + "/" if bundle.folder else ""
    files = [prefix + f for f in (*copies, CLIENT_CONFIG)]
    (folder / README).write_text(readme(files), encoding="utf-8")
    return [*(Artifact(f, Role.AUX, Runtime.NONE, Precision.INT8, parity=False) for f in files),
            Artifact(prefix + README, Role.AUX, Runtime.NONE, bundle.precision, parity=False)]
