"""What the device's compute costs in ``bench split``: per mode, the milliseconds on the chosen board and how they
were had (:class:`bottlefit.emulation.devicetime.Basis`).

* ``host``: this machine's own measured milliseconds (the bench's device peer times them).
* a Raspberry Pi (``pi4``, ``pi5``, ``pi3``, ``zero2``): what the device runs is counted under qemu arm64 emulation
  on the board's core (guest instructions per run, bottlefit.emulation.cost) and turned into milliseconds by the
  device-time model (bottlefit.emulation.devicetime): the head artifact the split mode runs (in its runtime), JPEG
  encoding of the crop for offload (Pillow), the whole model for local (ONNX Runtime), and the int8 wire's
  encoding (the coded wires' encoders are not counted yet: this host's ms x an assumed ratio, labelled so).
  Counts are cached in the user cache (``device-counts/``), keyed by the artifact's sha256, the core, the runtime,
  the sysroot's wheels and the guest script, so a repeated run does not recount.
* ``--device-factor X``: this host's measured milliseconds x X (the user's own measured ratio): assumed.
* ``--device-timings FILE``: ``bottlefit run-head --json`` output from the real board: the head's milliseconds are
  measured; the other parts stay predicted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.emulation.devicetime import Basis, Prediction, assumed_factor, measured, predict_ms
from bottlefit.emulation.devicetime import board as devicetime_board
from bottlefit.errors import UserError

Log = Callable[[str], None]
COUNT_SCHEMA = "bottlefit.devicecount/1"
PARTS = ("local", "offload", "split_head", "split_encode")  # what the device computes, per mode
# the weakest basis of a sum decides its label
ORDER = (Basis.MEASURED, Basis.PREDICTED, Basis.EXTRAPOLATED, Basis.ASSUMED)


@dataclass(frozen=True)
class DeviceClass:
    name: str
    factor: float | None  # host ms x factor (assumed); None: counted under emulation and predicted
    basis: str
    board: str | None = None  # devicetime board (pi4 ...): counted on its core


# A Pi's compute is counted under emulation on its core and predicted by the device-time model; the Jetson Nano's
# CPU has no emulated profile here, so it stays a stated assumption (measure with `bottlefit run-head` and pass
# --device-factor or --device-timings).
def _pi(name: str) -> DeviceClass:
    """A Pi of the device-time model's board table (its title, core and clock come from there)."""
    b = devicetime_board(name)
    return DeviceClass(name, None, f"{b.title}, {b.core.replace('cortex', 'Cortex').replace('-a', '-A')} "
                                   f"{b.clock_ghz:g} GHz: counted under emulation, predicted", name)


DEVICES: dict[str, DeviceClass] = {d.name: d for d in (
    DeviceClass("host", 1.0, "this machine's own compute, measured"),
    *(_pi(n) for n in ("pi5", "pi4", "pi3", "zero2")),
    DeviceClass("nano", 8.0, "Jetson Nano CPU (Cortex-A57 1.43 GHz): assumed 8x this host's core"),
)}


@dataclass
class DevicePlan:
    """Per part (PARTS) the device's milliseconds, or None where the part is host ms x ``factor``."""

    device: DeviceClass
    parts: dict[str, Prediction] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)  # instructions per part, with what was counted

    @property
    def counted(self) -> bool:
        return bool(self.parts)

    def mode_parts(self, mode: str) -> list[str]:
        return ["split_head", "split_encode"] if mode.startswith("split") else [mode]

    def ms(self, mode: str, host_ms: float) -> float:
        """The device's milliseconds for one request of ``mode`` whose device side took ``host_ms`` here."""
        if not self.counted:
            return float(self.device.factor or 1.0) * host_ms
        return float(sum(self.parts[p].ms for p in self.mode_parts(mode)))

    def basis(self, mode: str) -> Basis:
        if not self.counted:
            return Basis.MEASURED if self.device.name == "host" else Basis.ASSUMED
        return max((self.parts[p].basis for p in self.mode_parts(mode)), key=ORDER.index)

    def why(self, mode: str) -> str:
        if not self.counted:
            return self.device.basis
        return "; ".join(f"{p} {self.parts[p].ms:.2f} ms {self.parts[p].basis}: {self.parts[p].why}"
                         for p in self.mode_parts(mode))

    def to_dict(self) -> dict[str, Any]:
        return {"parts": {k: v.to_dict() for k, v in self.parts.items()}, "counts": self.counts}


@dataclass(frozen=True)
class BoardTimings:
    """The head's milliseconds measured on the board (``bottlefit run-head --json`` there); what it does not say is
    None."""

    median_ms: float
    model: str | None = None
    runtime: str | None = None
    threads: int | None = None
    runs: int | None = None

    def describe(self) -> str:
        def say(v: object) -> str:
            return "?" if v is None else str(v)

        return (f"run-head --json on the board: {say(self.model)} ({say(self.runtime)}, {say(self.threads)} "
                f"thread(s), median of {say(self.runs)} runs)")


def read_timings(path: Path) -> BoardTimings:
    """``bottlefit run-head --json`` output from the board: {"model", "runtime", "threads", "median_ms", ...}."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--device-timings {path}: cannot read it as JSON ({e}); give `bottlefit run-head --json` "
                        "output from the board") from None
    if isinstance(doc, list):
        doc = doc[0] if doc else {}
    if not isinstance(doc, dict) or not isinstance(doc.get("median_ms"), int | float) or doc["median_ms"] <= 0:
        raise UserError(f"--device-timings {path}: no positive \"median_ms\"; give `bottlefit run-head --json` "
                        "output from the board")
    return BoardTimings(float(doc["median_ms"]), doc.get("model"), doc.get("runtime"), doc.get("threads"),
                        doc.get("runs"))


# -- counting, cached


def _cache_path(parts: dict[str, Any]) -> Path:
    from bottlefit.files import user_cache_dir

    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return user_cache_dir() / "device-counts" / f"{key}.json"


def cached_count(key: dict[str, Any], count: Callable[[], float], log: Log) -> tuple[float, bool]:
    """(instructions, from the cache) for ``key``; ``count()`` runs only on a miss and its result is cached."""
    from bottlefit.files import atomic_write_text

    path = _cache_path(key)
    try:
        doc = json.loads(path.read_text())
        if doc.get("schema") == COUNT_SCHEMA and doc.get("key") == key:
            return float(doc["instructions"]), True
    except (OSError, ValueError):
        pass
    value = count()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"schema": COUNT_SCHEMA, "key": key, "instructions": value}) + "\n")
    return value, False


def _sha(path: Path) -> str:
    from bottlefit.files import sha256_file

    return sha256_file(path)


def default_heads(root: Path, boards: Sequence[str]) -> dict[str, dict[str, str]]:
    """Per board, the head its Raspberry Pi profile runs by default on this export (``RpiProfile.choose`` over the
    files in ``root``/rpi): file, runtime, delegate and sha256 (an ncnn head's weights, NAME.bin, hashed beside).
    A board without a profile, or whose head is missing, is left out: the wire contract's head stands for it."""
    from bottlefit.targets.rpi.profiles import PROFILES as RPI_PROFILES

    rpi = root / "rpi"
    files = {p.name for p in rpi.iterdir() if p.is_file()} if rpi.is_dir() else set()
    out: dict[str, dict[str, str]] = {}
    for board in boards:
        profile = RPI_PROFILES.get(board)
        if profile is None or not files:
            continue
        chosen = profile.choose(files)
        path = rpi / chosen.model
        if not path.is_file():
            continue
        rec = {"head": f"rpi/{chosen.model}", "runtime": chosen.runtime, "delegate": chosen.delegate,
               "sha256": _sha(path)}
        if chosen.runtime == "ncnn":
            rec["weights_sha256"] = _sha(path.with_suffix(".bin"))
        out[board] = rec
    return out


def plan(device: DeviceClass, *, head: Path, head_runtime: str, head_precision: str, full: Path,
         rgb: np.ndarray, jpeg_quality: int, encode_instructions: float | None, encode_host_ms: float,
         timings: BoardTimings | None, log: Log) -> DevicePlan:
    """Count and predict every part the device runs on ``device``'s board (see the module doc)."""
    if device.board is None:
        return DevicePlan(device)
    from bottlefit.emulation.arm64 import ensure_sysroot, get_core
    from bottlefit.emulation.cost import (
        GUEST,
        JPEG_GUEST,
        OVERLAY_WHEELS,
        instructions_per_inference,
        jpeg_instructions,
    )
    from bottlefit.targets.rpi.profiles import PROFILES

    board = device.board
    core = get_core(board)
    sysroot = ensure_sysroot(log)
    wheels = sysroot.describe()["wheels"]
    profile = PROFILES.get(board)
    ort_config = profile.ort_session_config if profile is not None else {}
    out = DevicePlan(device)

    def artifact(path: Path, runtime: str) -> float:
        key = {"what": "inference", "sha256": _sha(path), "core": core.cpu, "runtime": runtime, "wheels": wheels,
               **({"weights_sha256": _sha(path.with_suffix(".bin"))} if runtime == "ncnn" else {}),
               "guest": hashlib.sha256(GUEST.encode()).hexdigest()[:16],
               "ort_config": ort_config if runtime == "onnxruntime" else {}, "runs": 1}
        log(f"device {board}: counting {path.name} ({runtime}) on {core.cpu} under emulation (cached)")
        n, hit = cached_count(key, lambda: instructions_per_inference(
            sysroot, core, path, runtime, runs=1, ort_config=ort_config if runtime == "onnxruntime" else None), log)
        out.counts[path.name] = {"instructions": n, "core": core.cpu, "runtime": runtime, "cached": hit}
        return n

    n_full = artifact(full, "onnxruntime")
    out.parts["local"] = predict_ms(n_full, board, "onnxruntime", "fp32")
    if timings is not None:
        out.parts["split_head"] = measured(timings.median_ms, timings.describe())
    else:
        out.parts["split_head"] = predict_ms(artifact(head, head_runtime), board, head_runtime, head_precision)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    key = {"what": "jpeg", "sha256": hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest(),
           "quality": jpeg_quality, "core": core.cpu, "wheels": wheels, "overlay": list(OVERLAY_WHEELS), "runs": 3,
           "guest": hashlib.sha256(JPEG_GUEST.encode()).hexdigest()[:16]}
    log(f"device {board}: counting JPEG q{jpeg_quality} encoding (Pillow) on {core.cpu} under emulation (cached)")
    n_jpeg, hit = cached_count(key, lambda: jpeg_instructions(sysroot, core, rgb, jpeg_quality), log)
    out.counts["jpeg"] = {"instructions": n_jpeg, "core": core.cpu, "runtime": "pillow", "cached": hit}
    out.parts["offload"] = predict_ms(n_jpeg, board, "pillow", "fp32")
    out.parts["split_encode"] = encode_part(board, encode_instructions, encode_host_ms)
    if encode_instructions is not None:
        out.counts["wire"] = {"instructions": encode_instructions, "core": core.cpu, "runtime": "python"}
    return out


# The int8 wire's encoder on the board: the codes' bytes as they are (what build_request sends for --wire int8);
# one warm-up, then RUNS encodings between two marks. The coded wires (raw, zstd, entropy, context) run
# bottlefit/serve/boardcodec.py, which is not counted here.
INT8_WIRE_GUEST = '''\
import os
import sys

import numpy as np

codes, runs = np.load(sys.argv[1]), int(sys.argv[2])


def mark():
    try:
        os.close(@MARK_FD@)
    except OSError:
        pass


np.ascontiguousarray(codes).tobytes()
mark()
for _ in range(runs):
    body = np.ascontiguousarray(codes).tobytes()
mark()
print("ok", len(body))
'''


# The context wire is counted as the rpi bundle's recommended install runs it: boardcodec's compiled encoder
# (numba, steady state; its one-time compile is in bench/results/board_codec/), same bytes as the numpy path.
BOARD_JIT = True


def encoder_instructions(board: str, wire: str, codes: np.ndarray, log: Log, target: Path | None = None,
                         head: str | None = None) -> float | None:
    """Guest instructions of the board's wire encoder for one image's ``codes`` in ``wire`` on ``board``'s core
    (cached), or None where it is not counted (then the encoder's milliseconds are this host's x an assumed factor,
    labelled so). Counted: the int8 wire (the codes' bytes) and, given the export's ``target`` directory and its
    ``head``, the wires the board codes itself (raw, context: bottlefit.serve.wirecost)."""
    if wire != "int8":
        from bottlefit.serve.wirecost import BOARD_CODECS, export_encode_instructions

        if target is None or wire not in BOARD_CODECS:
            return None
        log(f"device {board}: counting the {wire} wire's encoding under emulation (cached)")
        return export_encode_instructions(board, wire, codes, target, head, jit=BOARD_JIT and wire == "context")
    from bottlefit.emulation.arm64 import ensure_sysroot, get_core
    from bottlefit.emulation.cost import MARK_FD, count_guest_script, span_per_run

    script = INT8_WIRE_GUEST.replace("@MARK_FD@", str(MARK_FD))
    core, sysroot = get_core(board), ensure_sysroot(log)
    codes = np.ascontiguousarray(codes)
    key = {"what": "wire-int8", "sha256": hashlib.sha256(codes.tobytes() + str(codes.shape).encode()).hexdigest(),
           "dtype": str(codes.dtype), "core": core.cpu, "wheels": sysroot.describe()["wheels"], "runs": 20,
           "guest": hashlib.sha256(script.encode()).hexdigest()[:16]}

    def count() -> float:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="bottlefit-wire-") as tmp:
            path = Path(tmp) / "codes.npy"
            np.save(path, codes)
            c = count_guest_script(sysroot, core, script, [str(path), 20], name="int8 wire encoding")
        return span_per_run(c, 20, "int8 wire encoding")

    log(f"device {board}: counting the int8 wire's encoding on {core.cpu} under emulation (cached)")
    return cached_count(key, count, log)[0]


def encode_part(board: str, instructions: float | None, host_ms: float) -> Prediction:
    """The wire encoder on ``board``: from its counted guest instructions (Python + numpy on the board's core, at
    the ncnn IPC: extrapolated), else this host's measured ms x the board's host-relative factor (assumed)."""
    if instructions is not None:
        return predict_ms(instructions, board, "python", "fp32")
    return assumed_factor(host_ms, host_factor(board), "the wire encoder is not counted under emulation here; "
                          f"{board}'s host-relative factor (assumed)")


def counts_board(device: DeviceClass) -> bool:
    """Whether the device's work is counted under emulation on its board's core (no --device-factor given)."""
    return device.factor is None and device.board is not None


def encode_ms(device: DeviceClass, wire: str, host_ms: float, instructions: float | None = None) -> Prediction:
    """The device's encoding of ``wire`` (used to choose the wire): predicted from its counted ``instructions`` on
    a board, else from this host's measured ``host_ms``."""
    if not counts_board(device):
        if device.name == "host":
            return measured(host_ms, "this host's own encoding")
        return assumed_factor(host_ms, float(device.factor or 1.0), device.basis)
    return encode_part(str(device.board), instructions, host_ms)


# The Pi 4's ratio to this project's x86 build hosts for what is not counted (the wire encoder): a stated
# assumption, not a measurement. Other boards: scaled by clock x fitted fp32 IPC of their core against the Pi 4's.
PI4_HOST_FACTOR = 6.0


def host_factor(board: str) -> float:
    from bottlefit.emulation.devicetime import ipc

    def speed(name: str) -> float:
        b = devicetime_board(name)
        return b.clock_ghz * ipc(b.core, "ncnn", "fp32")[0]

    return PI4_HOST_FACTOR * speed("pi4") / speed(board)
