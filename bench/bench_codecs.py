"""Coded bottleneck payload per codec (bottlefit.serve.codecs) vs raw int8 and vs the empirical entropy.

For each export, the int8 head's codes on the built-in held-out photos (21 crops; the tables, shipped in the export
as codec/<contract id>.npz, are fitted on the disjoint built-in calibration photos) under the head's reference
semantics. Bytes are per image, payload only (the frame header, the same for every codec, is given apart);
entropy = the order-0 entropy of the symbols over all held-out images (global histogram, and per channel).
Encode/decode times are medians on this host (the context codec encodes with the boards' pure-Python coder,
bottlefit/serve/boardcodec.py, and decodes with constriction, as the server does).

``--pi pi4`` (or pi3, pi5, zero2) also times the board's context encoder on that Raspberry Pi core under qemu
user-mode emulation, with the Pi OS Python and numpy (bottlefit.emulation.arm64; instructions are emulated,
so the figure is an upper bound of the board's own time, and is printed beside this host's for the same
images).

    .venv/bin/python bench/bench_codecs.py [OUT ...] [--pi pi4]   # default: untrained mini_resnet and R152 v2 (12 ch)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bottlefit.models.card import ModelCard
from bottlefit.serve import codecs
from bottlefit.serve.contract import find_targets
from bottlefit.serve.head import calibration_symbols, load_tables


def _export(root: Path, name: str, **model: object) -> Path:
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions

    out = root / name
    export(ExportRequest(ModelSource(untrained=True, **model), "onnx", out, OnnxOptions(int8=True, triton=False),  # type: ignore[arg-type]
                         parity=ParityOptions(emulate=Emulate.parse("none"))))
    return out


def jpeg_bytes(card: ModelCard, quality: int = 95) -> float:
    """Mean JPEG size of the same held-out crops the model sees (8-bit RGB at its input size): what offloading
    the input would send instead of the bottleneck."""
    import io

    from PIL import Image

    from bottlefit.calibration.dataset import CalibrationSet

    mc = card
    x = CalibrationSet.builtin(mc, part="heldout", log=lambda m: None).images
    rgb = np.clip((x * np.array(mc.std).reshape(1, 3, 1, 1) + np.array(mc.mean).reshape(1, 3, 1, 1)) * 255, 0, 255)
    sizes = []
    for img in np.rint(rgb).astype(np.uint8).transpose(0, 2, 3, 1):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell())
    return float(np.mean(sizes))


PI_SCRIPT = """
import sys, time
import numpy as np
import boardcodec
t = boardcodec.load(sys.argv[1])
sym = np.load(sys.argv[2])
ms = []
for s in sym:
    t0 = time.perf_counter()
    boardcodec.encode(t, s)
    ms.append((time.perf_counter() - t0) * 1e3)
print(float(np.median(ms)))
"""


def pi_encode_ms(tables: codecs.CodecTables, sym: np.ndarray, profile: str) -> float:
    """Median ms of the board's context encoder per image on the emulated Pi core ``profile``."""
    import shutil

    from bottlefit.emulation.arm64 import ensure_sysroot, get_core, run_python
    from bottlefit.serve import boardcodec

    with tempfile.TemporaryDirectory(prefix="bench-codecs-pi-") as d:
        tmp = Path(d)
        shutil.copyfile(boardcodec.__file__, tmp / "boardcodec.py")
        (tmp / "run.py").write_text(PI_SCRIPT)
        tables.save(tmp / "tables.npz")
        np.save(tmp / "sym.npy", sym)
        cp = run_python(ensure_sysroot(print), get_core(profile), tmp / "run.py", ["tables.npz", "sym.npy"], cwd=tmp,
                        timeout=1800)
        if cp.returncode != 0:
            raise RuntimeError(f"emulated encode failed: {cp.stderr.strip()[-500:]}")
        return float(cp.stdout.strip().splitlines()[-1])


def bench(out: Path, pi: str | None = None) -> None:
    for target in find_targets(out):
        for contract in (c for c in target.contracts if c.quantized):
            tables = load_tables(target, contract)
            sym = calibration_symbols(target, contract, "heldout")
            codes = [codecs.from_symbols(contract, s) for s in sym]
            n = int(np.prod(contract.shape))
            hdr = codecs.read_header(codecs.encode_frame(contract, codes[0], "raw")).size
            h0 = codecs.entropy_bits(sym) / 8 / len(sym)
            hc = codecs.entropy_bits(sym, per_channel=True) / 8 / len(sym)
            print(f"\n{target.card.arch} {target.path.name}/{contract.head}: {contract.dtype}"
                  f"{list(contract.shape)} = {n} B raw; {len(sym)} held-out images; frame header {hdr} B")
            jpeg = jpeg_bytes(target.card)
            print(f"  empirical entropy: order-0 {h0:8.1f} B ({h0 / n:.3f}x raw), per channel {hc:8.1f} B "
                  f"({hc / n:.3f}x raw); JPEG q95 of the same crops {jpeg:8.1f} B (raw int8 = {n / jpeg:.3f}x)")
            for codec in codecs.CODECS:
                sizes, enc_ms, dec_ms = [], [], []
                for c in codes:
                    t0 = time.perf_counter()
                    f = codecs.encode_frame(contract, c, codec, tables)
                    t1 = time.perf_counter()
                    _, back = codecs.decode_frame(f, {contract.contract_id: contract}, lambda _, t=tables: t)
                    t2 = time.perf_counter()
                    assert np.array_equal(back, c)
                    sizes.append(len(f) - hdr)
                    enc_ms.append((t1 - t0) * 1e3)
                    dec_ms.append((t2 - t1) * 1e3)
                m = float(np.mean(sizes))
                print(f"  {codec:8s} {m:8.1f} B  {m / n:.3f}x raw  {m / h0:.3f}x entropy  {m / jpeg:.3f}x JPEG  encode "
                      f"{statistics.median(enc_ms):6.2f} ms  decode {statistics.median(dec_ms):6.2f} ms")
                if codec == "context":
                    host_ms = statistics.median(enc_ms)
            if pi:
                board = pi_encode_ms(tables, sym, pi)
                print(f"  context encoder on the emulated {pi} core (qemu, Pi OS python + numpy): {board:8.1f} ms "
                      f"per image = {board / host_ms:.1f}x this host's {host_ms:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outs", nargs="*", type=Path)
    ap.add_argument("--pi", metavar="BOARD", help="also time the board's context encoder on this emulated Pi core "
                    "(pi4, pi5, pi3, zero2)")
    args = ap.parse_args()
    outs = args.outs
    tmp = None
    if not outs:
        tmp = tempfile.TemporaryDirectory(prefix="bench-codecs-")
        root = Path(tmp.name)
        outs = [_export(root, "mini", arch="mini_resnet", bottleneck_channel=4),
                _export(root, "r152", arch="custom_resnet152", bottleneck_channel=12, bottleneck_ver="2")]
    for out in outs:
        bench(out, args.pi)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
