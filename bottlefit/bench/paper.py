"""``bottlefit bench split --paper``: the BottleFit paper's comparison (split vs local, split vs offload, latency
and energy) on its own model, ResNet-152 ver2 at 224x224 with 12 and 3 bottleneck channels, on a Pi 4 and a Pi 5
over the bench's four links.

The run composes figures each taken where it can be had honestly, and every figure says which kind it is:

* **measured** here, on the built-in held-out photos: JPEG bytes of the 224x224 crop (offload's payload), the coded
  bottleneck bytes per wire (split's payload), the server's milliseconds (the tail plus the wire's decoding for
  split; JPEG decoding plus the whole model for offload), on this host's CPU;
* **predicted** (or extrapolated, as the device-time model labels it): the device's milliseconds of the head each
  board's profile runs by default (bottlefit.targets.rpi.profiles: ncnn int8 on every Pi), of the whole model (the
  export's fp32 head.onnx + tail.onnx, what "local" runs) and of JPEG encoding (Pillow), from guest instructions
  counted under emulation on the board's core (:mod:`bottlefit.emulation.cost`) through
  :mod:`bottlefit.emulation.devicetime`;
* **assumed**: what has no count (the wire encoder; everything with ``--no-count`` or without emulation): this
  host's milliseconds x the board's stated host-relative factor (:func:`bottlefit.bench.device.host_factor`);
* **modelled**: the network (RTT x 2 for the handshake and the request, each direction's framed bytes at the
  link's rate, as the bench's analytic link model) and the energy (:mod:`bottlefit.bench.energy`).

Counting is ``bench split --board``'s (:func:`bottlefit.bench.device.plan`, cached in the user cache) and slow
for the whole R152 (minutes under qemu). The counts go into the result JSON with what they depend on (the
artifacts' and the JPEG crop's sha256); a later run into the same OUT re-predicts from them without counting, so the
committed report can be re-made (for example after the device-time model is re-fitted) in seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bottlefit.bench import energy
from bottlefit.bench.device import default_heads
from bottlefit.bench.links import PROFILES, LinkProfile
from bottlefit.errors import EnvironmentProblem, UserError
from bottlefit.files import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from bottlefit.bench.split import Images, Model
    from bottlefit.models.card import ModelCard
    from bottlefit.runtimes import Runner
    from bottlefit.serve.contract import TargetExport, WireContract
    from bottlefit.serve.head import HeadCodes

Log = Callable[[str], None]
SCHEMA = "bottlefit.bench.paper/1"
ARCH = "custom_resnet152"
CHANNELS = (12, 3)
BOARDS = ("pi4", "pi5")
# BottleFit (Matsubara et al., WoWMoM 2022), abstract: "up to" figures, best case over its boards and links
PAPER = {"latency_vs_local_pct": -89.0, "latency_vs_offload_pct": -55.0,
         "energy_vs_local_pct": -49.0, "energy_vs_offload_pct": -37.0}
PAPER_CITE = ("Y. Matsubara, D. Callegaro, S. Singh, M. Levorato, F. Restuccia, \"BottleFit: Learning Compressed "
              "Representations in Deep Neural Networks for Effective and Efficient Split Computing\", IEEE WoWMoM "
              "2022, arXiv:2201.02693 (abstract: up to -89% latency / -49% power vs local, -55% / -37% vs edge "
              "offloading; Jetson Nano and a Raspberry Pi)")
# Bytes around the payload (assumed, not measured here): HTTP/1.1 request line and headers with the KServe v2 JSON
# header, and the response (headers + top-k JSON). The netns bench measures them per request on the link.
REQUEST_OVERHEAD_B = 400
RESPONSE_B = 600
THREADS = 1  # the device runs one inference thread (as the bench's device peer)


class Basis(StrEnum):
    MEASURED = "measured"
    PREDICTED = "predicted"
    EXTRAPOLATED = "extrapolated"  # counted, at the IPC of another runtime (bottlefit.emulation.devicetime)
    ASSUMED = "assumed"
    MODELLED = "modelled"


@dataclass(frozen=True)
class Figure:
    value: float
    basis: Basis
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "basis": str(self.basis), "why": self.why}


# -- what is measured on the host, per model


@dataclass
class Measured:
    """One model's host-side figures on the images (medians); the inputs of :func:`compose`."""

    channels: int
    images: int
    jpeg_quality: int
    jpeg_bytes: float
    jpeg_encode_host_ms: float
    wire: str
    wires: dict[str, dict[str, float]]  # wire -> bytes, encode_host_ms, decode_server_ms
    head: str  # target/file of the device's head
    head_runtime: str
    head_host_ms: float
    full_host_ms: float
    tail_server_ms: float  # the tail on the server (this host)
    offload_server_ms: float  # JPEG decode + the whole model on the server (this host)
    head_sha256: str = ""
    full_sha256: str = ""
    jpeg_rgb_sha256: str = ""  # the crop whose JPEG encoding is counted on the device (the first image)
    raw_bytes: int = 0  # uint8 RGB of the crop
    # board -> the head its profile runs by default ({"head", "runtime", "delegate", "sha256"}): what is counted and
    # predicted on that board; ``head`` above is the wire contract's (payload bytes and host ms are measured on it)
    board_heads: dict[str, dict[str, str]] = field(default_factory=dict)

    def board_head(self, board: str) -> dict[str, str]:
        """The head counted on ``board``: its profile's default, else (no profile recorded) the contract's."""
        return self.board_heads.get(board) or {"head": self.head, "runtime": self.head_runtime, "delegate": "",
                                               "sha256": self.head_sha256}

    @property
    def payload_bytes(self) -> float:
        return self.wires[self.wire]["bytes"]

    @property
    def wire_encode_host_ms(self) -> float:
        return self.wires[self.wire]["encode_host_ms"]

    @property
    def split_server_ms(self) -> float:
        return self.tail_server_ms + self.wires[self.wire]["decode_server_ms"]


# -- device milliseconds


@dataclass
class DeviceTimes:
    """Per board: each device-side piece of work as a :class:`Figure` (ms)."""

    board: str
    head: Figure
    full: Figure
    jpeg_encode: Figure
    wire_encode: Figure

    def mode_ms(self, mode: str) -> float:
        if mode == "local":
            return self.full.value
        if mode == "offload":
            return self.jpeg_encode.value
        return self.head.value + self.wire_encode.value

    def mode_basis(self, mode: str) -> str:
        parts = {"local": [self.full], "offload": [self.jpeg_encode], "split": [self.head, self.wire_encode]}[mode]
        return " + ".join(str(f.basis) for f in parts)


def assumed_ms(host_ms: float, board: str, what: str) -> Figure:
    """This host's ms x the board's host-relative factor (bottlefit.bench.device.host_factor): assumed."""
    from bottlefit.bench.device import host_factor

    f = host_factor(board)
    return Figure(host_ms * f, Basis.ASSUMED, f"{what}: this host's {host_ms:.2f} ms x {f:.2f} ({board}'s "
                                              "host-relative factor, assumed)")


def _figure(what: str, p: Any) -> Figure:
    return Figure(float(p.ms), Basis(str(p.basis)), f"{what}: {p.why}")


def from_counts(m: Measured, board: str, counts: dict[str, float], full_note: str = "") -> DeviceTimes:
    """Device ms from guest instructions counted on ``board``'s core ({"head", "full", "jpeg"}) through the
    device-time model; the wire encoder is not counted (host ms x factor, as ``bench split --board``)."""
    from bottlefit.bench.device import encode_part
    from bottlefit.emulation.devicetime import predict_ms

    bh = m.board_head(board)
    head_precision = "int8" if "int8" in bh["head"] else "fp32"
    host = host_times(m, board)
    full_what = "whole model (fp32 head.onnx + tail.onnx, ONNX Runtime)"
    return DeviceTimes(
        board=board,
        head=_figure(f"head {bh['head']} ({bh['runtime']})",
                     predict_ms(counts["head"], board, bh["runtime"], head_precision, THREADS))
        if "head" in counts else host.head,
        full=_figure(full_what + full_note, predict_ms(counts["full"], board, "onnxruntime", "fp32", THREADS))
        if "full" in counts else host.full,
        jpeg_encode=_figure(f"JPEG q{m.jpeg_quality} encoding (Pillow)",
                            predict_ms(counts["jpeg"], board, "pillow", "fp32", THREADS))
        if "jpeg" in counts else host.jpeg_encode,
        wire_encode=_figure(f"wire {m.wire} encoding", encode_part(board, None, m.wire_encode_host_ms)))


def host_times(m: Measured, board: str) -> DeviceTimes:
    """Without counts (--no-count, or no emulation here): every part is this host's ms x the board's factor."""
    bh = m.board_head(board)
    what = f"head {m.head}" if bh["head"] == m.head else f"head {bh['head']} (timed here as {m.head})"
    return DeviceTimes(board=board, head=assumed_ms(m.head_host_ms, board, what),
                       full=assumed_ms(m.full_host_ms, board, "whole model (ONNX Runtime)"),
                       jpeg_encode=assumed_ms(m.jpeg_encode_host_ms, board, f"JPEG q{m.jpeg_quality} encoding"),
                       wire_encode=assumed_ms(m.wire_encode_host_ms, board, f"wire {m.wire} encoding"))


def count_parts(m: Measured, board: str, head_file: Path, full: Path, rgb: np.ndarray, log: Log,
                full_timeout: float = 900.0) -> dict[str, float]:
    """Guest instructions per inference of the head and the whole model, and of one JPEG encoding of ``rgb``, on
    ``board``'s core, each part on its own: ``bench split --board``'s counts (bottlefit.bench.device.plan's cache
    keys, so the two share one cache). A part that cannot be counted here (no emulation; the whole model past
    ``full_timeout`` seconds, 0: not tried) is left out, with the reason logged: its ms are then assumed."""
    import subprocess

    from bottlefit.bench.device import cached_count
    from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot, get_core
    from bottlefit.emulation.cost import OVERLAY_WHEELS, count_instructions, jpeg_instructions
    from bottlefit.targets.rpi.profiles import PROFILES as RPI_PROFILES

    try:
        core, sysroot = get_core(board), ensure_sysroot(log)
    except EmulationUnavailable as e:
        log(f"no counts on {board}: {e}")
        return {}
    wheels = sysroot.describe()["wheels"]
    profile = RPI_PROFILES.get(board)
    ort = dict(profile.ort_session_config) if profile is not None else {}
    bh = m.board_head(board)

    def inference(path: Path, runtime: str, timeout: float, delegate: str = "") -> float:
        from bottlefit.targets.rpi.profiles import ORT_CONFIG

        cfg = (dict(ORT_CONFIG.get(delegate, ort)) if delegate else ort) if runtime == "onnxruntime" else {}
        key = {"what": "inference", "sha256": sha256(path), "core": core.cpu, "runtime": runtime, "wheels": wheels,
               "ort_config": cfg, "runs": 1}
        if runtime == "ncnn":  # NAME.param holds the layers, NAME.bin the weights
            key["weights_sha256"] = sha256(path.with_suffix(".bin"))

        def run() -> float:
            c = count_instructions(sysroot, core, path, runtime, runs=1, timeout=timeout, ort_config=cfg or None)
            if len(c.marks) != 2:
                raise EmulationUnavailable(f"{len(c.marks)} marks, not 2, counting {path.name}")
            return float(c.marks[1] - c.marks[0])

        return cached_count(key, run, log)[0]

    out: dict[str, float] = {}
    parts: list[tuple[str, Callable[[], float]]] = [
        ("head", lambda: inference(head_file, bh["runtime"], 900.0, bh["delegate"])),
        ("jpeg", lambda: cached_count(
            {"what": "jpeg", "sha256": _rgb_sha(rgb), "quality": m.jpeg_quality, "core": core.cpu, "wheels": wheels,
             "overlay": list(OVERLAY_WHEELS), "runs": 3},
            lambda: jpeg_instructions(sysroot, core, rgb, m.jpeg_quality), log)[0])]
    if full_timeout > 0:
        parts.append(("full", lambda: inference(full, "onnxruntime", full_timeout)))
    else:
        log(f"{board}: the whole model is not counted (--paper-count-timeout 0): its ms are assumed")
    for name, fn in parts:
        log(f"{board}: counting the {name} under emulation on {core.cpu} (cached)")
        try:
            out[name] = fn()
        except (EmulationUnavailable, subprocess.TimeoutExpired) as e:
            log(f"{board}: the {name} not counted ({str(e).splitlines()[0][-160:]}): its ms are assumed")
    return out


def count_key(m: Measured, board: str, full_counted_sha256: str | None = None) -> dict[str, Any]:
    """What the counts of one (model, board) depend on: a result JSON's counts are reused where this matches.
    ``full_counted_sha256``: the whole model actually counted, where it is another model's (--paper-share-count)."""
    bh = m.board_head(board)
    key = {"board": board, "head": bh["head"], "head_runtime": bh["runtime"], "head_sha256": bh["sha256"],
           **({"head_weights_sha256": bh["weights_sha256"]} if bh.get("weights_sha256") else {}),
           "full_sha256": m.full_sha256,
           "jpeg_rgb_sha256": m.jpeg_rgb_sha256, "jpeg_quality": m.jpeg_quality}
    if full_counted_sha256 and full_counted_sha256 != m.full_sha256:
        key["full_counted_sha256"] = full_counted_sha256
    return key


def conv_macs(model_path: Path) -> int:
    """Multiply-accumulates of one inference of an ONNX model's Conv and Gemm/MatMul nodes (batch 1), from its
    shapes: enough to say how far apart two whole models are."""
    import onnx
    from onnx import shape_inference

    m = shape_inference.infer_shapes(onnx.load(str(model_path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*m.graph.value_info, *m.graph.input, *m.graph.output]}
    shapes.update({t.name: list(t.dims) for t in m.graph.initializer})
    total = 0
    for node in m.graph.node:
        if node.op_type == "Conv":
            w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and out:
                total += int(np.prod([v or 1 for v in out])) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and out:
                total += int(np.prod([v or 1 for v in out])) * int(a[-1] or 1)
    return total


def earlier_counts(path: Path) -> list[dict[str, Any]]:
    """The device records (with "key" and "counts") of an earlier result JSON; [] when there is none."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [d for d in doc.get("devices", []) if isinstance(d, dict) and d.get("counts") and d.get("key")]


def reuse(earlier: Sequence[dict[str, Any]], key: dict[str, Any]) -> dict[str, float] | None:
    return next(({k: float(v) for k, v in d["counts"].items()} for d in earlier if d["key"] == key), None)


# -- composing latency and energy


def network_ms(link: LinkProfile, up_payload: float) -> tuple[float, float, float]:
    """(total, uplink, downlink) ms of one request on ``link``: the handshake's and the request's round trips, and
    each direction's bytes (payload + headers, framed) at the link's rate (the bench's analytic model)."""
    from bottlefit.bench.split import _framed

    up = link.transfer_ms(_framed(int(round(up_payload)) + REQUEST_OVERHEAD_B))
    down = link.transfer_ms(_framed(RESPONSE_B))
    return 2 * link.rtt_ms + up + down, up, down


MODES = ("local", "offload", "split")


def compose(m: Measured, dev: DeviceTimes, links: Sequence[LinkProfile]) -> list[dict[str, Any]]:
    """One row per mode and link: device, network, server and end-to-end ms, and the energy model's joules."""
    rows = []
    power = energy.board(dev.board)
    for p in links:
        for mode in MODES:
            device = dev.mode_ms(mode)
            if mode == "local":
                net = up = down = server = 0.0
                payload = 0.0
                e = energy.inference_energy(power, device_ms=device, wait_ms=0.0, threads=THREADS)
            else:
                payload = m.jpeg_bytes if mode == "offload" else m.payload_bytes
                server = m.offload_server_ms if mode == "offload" else m.split_server_ms
                net, up, down = network_ms(p, payload)
                e = energy.inference_energy(power, device_ms=device, wait_ms=net + server,
                                            radio=energy.radio_for_link(p.name), up_ms=up, down_ms=down,
                                            rate_mbit=p.rate_mbit, threads=THREADS)
            rows.append({"channels": m.channels, "board": dev.board, "link": p.name, "mode": mode,
                         "device_ms": device, "device_basis": dev.mode_basis(mode), "network_ms": net,
                         "uplink_ms": up, "server_ms": server, "latency_ms": device + net + server,
                         "payload_bytes": payload, "energy_j": e.total_j, "energy_compute_j": e.compute_j,
                         "energy_wait_j": e.wait_j, "energy_radio_j": e.radio_j,
                         "energy_connection_j": e.connection_j})
    return rows


def pct(a: float, b: float) -> float:
    return 100.0 * (a / b - 1.0)


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per channels, board and link: split against local and offload, latency and energy, as % change; and the
    latency ratios again with the server's ms left out (the bound an edge GPU server approaches)."""
    out = []
    keys = sorted({(r["channels"], r["board"], r["link"]) for r in rows},
                  key=lambda k: (-k[0], k[1], PROFILES[k[2]].rate_mbit if k[2] in PROFILES else 0.0))
    for c, b, link in keys:
        by = {r["mode"]: r for r in rows if (r["channels"], r["board"], r["link"]) == (c, b, link)}
        s, lo, of = by["split"], by["local"], by["offload"]
        out.append({"channels": c, "board": b, "link": link,
                    "latency_vs_local_pct": pct(s["latency_ms"], lo["latency_ms"]),
                    "latency_vs_offload_pct": pct(s["latency_ms"], of["latency_ms"]),
                    "energy_vs_local_pct": pct(s["energy_j"], lo["energy_j"]),
                    "energy_vs_offload_pct": pct(s["energy_j"], of["energy_j"]),
                    "latency_vs_local_pct_no_server": pct(s["latency_ms"] - s["server_ms"], lo["latency_ms"]),
                    "latency_vs_offload_pct_no_server": pct(s["latency_ms"] - s["server_ms"],
                                                            of["latency_ms"] - of["server_ms"])})
    return out


def best(rs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each of the paper's four figures, the most favourable row for split (the paper's "up to")."""
    return {k: min(rs, key=lambda r, k=k: r[k]) for k in PAPER}


def signed(v: float) -> str:
    return f"{'−' if v < 0 else '+'}{abs(v):.1f}%"


def headline(rs: list[dict[str, Any]], model: str = "R152 v2") -> str:
    b = best(rs)

    def where(r: dict[str, Any]) -> str:
        return f"{r['board']} {PROFILES[r['link']].label if r['link'] in PROFILES else r['link']} {r['channels']} ch"

    return (f"{model}, up to (best board/link/channels): latency split vs local "
            f"{signed(b['latency_vs_local_pct']['latency_vs_local_pct'])} ({where(b['latency_vs_local_pct'])}; "
            f"paper {signed(PAPER['latency_vs_local_pct'])}), split vs offload "
            f"{signed(b['latency_vs_offload_pct']['latency_vs_offload_pct'])} ({where(b['latency_vs_offload_pct'])}; "
            f"paper {signed(PAPER['latency_vs_offload_pct'])}); energy (model) split vs local "
            f"{signed(b['energy_vs_local_pct']['energy_vs_local_pct'])} (paper {signed(PAPER['energy_vs_local_pct'])}),"
            f" vs offload {signed(b['energy_vs_offload_pct']['energy_vs_offload_pct'])} "
            f"(paper {signed(PAPER['energy_vs_offload_pct'])})")


def sha256(path: Path) -> str:
    from bottlefit.files import sha256_file

    return sha256_file(path)


# -- the models


@dataclass(frozen=True)
class PaperSource:
    """One of the paper's models: a checkpoint file, or the architecture untrained (seed 0)."""

    channels: int
    checkpoint: Path | None = None
    arch: str = ARCH

    def key(self) -> str:
        if self.checkpoint is None:
            return f"{self.arch}_{self.channels}-untrained-seed0"
        return f"{self.checkpoint.stem}-{sha256(self.checkpoint)[:12]}"

    def describe(self) -> str:
        return (f"checkpoint {self.checkpoint}" if self.checkpoint is not None else
                f"{self.arch}{' ver2' if self.arch == ARCH else ''}, {self.channels} channels, untrained (seed 0)")


def parse_sources(spec: str | None) -> list[PaperSource]:
    """``--paper-checkpoints 12=A.pt,3=B.pt`` (None: both models untrained, seed 0)."""
    if not spec:
        return [PaperSource(c) for c in CHANNELS]
    out = []
    for item in spec.split(","):
        c, sep, path = item.partition("=")
        if not sep or not c.strip().isdigit():
            raise UserError(f"--paper-checkpoints {item!r}: write CHANNELS=PATH, e.g. 12=r152v2_12.pt")
        p = Path(path.strip())
        if not p.is_file():
            raise UserError(f"--paper-checkpoints: {p}: no such checkpoint")
        out.append(PaperSource(int(c), p))
    return out


def model_label(sources: Sequence[PaperSource]) -> str:
    archs = {s.arch for s in sources if s.checkpoint is None}
    return "R152 v2" if archs <= {ARCH} else ", ".join(sorted(archs))


def export_model(src: PaperSource, workdir: Path, log: Log) -> Path:
    """The model exported for rpi (the default Pi head) and onnx (fp32 head + tail), cached in the work dir."""
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions
    from bottlefit.targets.rpi import RpiOptions

    root = workdir / "paper-export" / src.key()
    model = (ModelSource(checkpoint=src.checkpoint) if src.checkpoint is not None else
             ModelSource(untrained=True, arch=src.arch, bottleneck_channel=src.channels,
                         bottleneck_ver="2" if src.arch == ARCH else None))
    for target, options in (("rpi", RpiOptions()), ("onnx", OnnxOptions(triton=False))):
        if (root / target / "manifest.json").is_file():
            continue
        log(f"model: exporting {src.describe()} for {target} into {root} (once; cached)")
        export(ExportRequest(model, target, root, options, parity=ParityOptions(emulate=Emulate.parse("none"))),
               log=lambda m: None)
    return root


# -- measuring on the host


def _median_ms(fn: Callable[[int], Any], n: int) -> float:
    """Median over ``n`` calls of this thread's CPU time, not wall time: every runtime here computes on the calling
    thread (one thread), so the figure holds on a host shared with other jobs, where wall time does not."""
    times = []
    for i in range(n):
        t0 = time.thread_time_ns()
        fn(i)
        times.append((time.thread_time_ns() - t0) / 1e6)
    return float(statistics.median(times))


def measure(root: Path, channels: int, images: int, jpeg_quality: int, wire: str, headline_link: LinkProfile,
            log: Log) -> tuple[Measured, Path, Path, np.ndarray]:
    """The host-side figures of one exported model on the built-in held-out photos; returns them with the
    device's head artifact and the whole model (``full.onnx``, cached beside the export)."""
    from bottlefit.bench.split import load_images

    hm = _HostModel.load(root)
    imgs = load_images(hm.model, images)
    n = len(imgs.x)
    if n < 1:
        raise UserError(f"{root}: no images")
    codes, ms, jpegs = _time_modes(hm, imgs, jpeg_quality)
    wires = _measure_wires(hm, codes, log)
    wire = _pick_wire(wire, wires, headline_link, hm.contract.head)
    m = Measured(channels=channels, images=n, jpeg_quality=jpeg_quality,
                 jpeg_bytes=float(np.median([len(j) for j in jpegs])), jpeg_encode_host_ms=ms["jpeg"], wire=wire,
                 wires=wires, head=f"{hm.contract.target}/{hm.contract.head}", head_runtime=hm.contract.runtime,
                 head_host_ms=ms["head"], full_host_ms=ms["full"], tail_server_ms=ms["tail"],
                 offload_server_ms=ms["offload"], head_sha256=sha256(hm.head_file), full_sha256=sha256(hm.full),
                 raw_bytes=int(np.prod(hm.card.input_shape)), jpeg_rgb_sha256=_rgb_sha(imgs.rgb[0]))
    return m, hm.head_file, hm.full, imgs.rgb[0]


@dataclass
class _HostModel:
    """One export's pieces the host times: the wire contract's head, the ONNX tail and the whole model."""

    model: Model
    card: ModelCard
    target: TargetExport  # the wire contract's head's target
    contract: WireContract
    head: HeadCodes  # images -> wire codes
    head_file: Path
    tail: Runner  # tail.onnx
    full: Path  # full.onnx (the whole model), written beside the export once
    runner: Runner  # full.onnx

    @classmethod
    def load(cls, root: Path) -> _HostModel:
        from bottlefit.bench.split import Model, full_onnx
        from bottlefit.runtimes import get_runner
        from bottlefit.serve.client import pick_head
        from bottlefit.serve.contract import find_targets
        from bottlefit.serve.head import HeadCodes

        owner = next((t for t in find_targets(root) if t.tail() is not None), None)
        if owner is None:
            raise UserError(f"{root}: no ONNX tail (tail.onnx); export with --target onnx")
        model = Model(root, owner.card, str(root), "none")
        full = root / "full.onnx"
        if not full.is_file():
            full_onnx(model, full)
        target, contract = pick_head(root, None)
        tail_art = owner.tail()
        assert tail_art is not None
        return cls(model=model, card=model.card, target=target, contract=contract,
                   head=HeadCodes(target, contract, num_threads=THREADS),
                   head_file=target.path / target.artifact(contract.head).file,
                   tail=get_runner("onnxruntime", owner.path / tail_art.file, num_threads=THREADS), full=full,
                   runner=get_runner("onnxruntime", full, num_threads=THREADS))


def _time_modes(hm: _HostModel, imgs: Images, jpeg_quality: int) -> tuple[list[np.ndarray], dict[str, float],
                                                                         list[bytes]]:
    """(the head's codes per image, median CPU ms of each piece {head, full, jpeg, offload, tail}, the JPEGs)."""
    from bottlefit.bench.service import decode_jpeg
    from bottlefit.bench.split import jpeg

    n, head, runner, tail, card, contract = len(imgs.x), hm.head, hm.runner, hm.tail, hm.card, hm.contract
    fin, tin = runner.input_names[0], tail.input_names[0]
    head(imgs.x[:1])  # first-call allocations out of the medians
    codes = [head(imgs.x[i : i + 1])[0] for i in range(n)]
    ms = {"head": _median_ms(lambda i: head(imgs.x[i : i + 1]), n)}
    runner.infer({fin: imgs.x[:1]})
    ms["full"] = _median_ms(lambda i: runner.infer({fin: imgs.x[i : i + 1]}), n)
    jpegs = [jpeg(imgs.rgb[i], jpeg_quality) for i in range(n)]
    ms["jpeg"] = _median_ms(lambda i: jpeg(imgs.rgb[i], jpeg_quality), n)
    ms["offload"] = _median_ms(lambda i: runner.infer({fin: card.normalize(decode_jpeg(jpegs[i], card)[None])}), n)
    z = [(contract.dequantize(c[None]) if contract.quantized else c[None]).astype(np.float32) for c in codes]
    tail.infer({tin: z[0]})
    ms["tail"] = _median_ms(lambda i: tail.infer({tin: z[i]}), n)
    return codes, ms, jpegs


def _measure_wires(hm: _HostModel, codes: list[np.ndarray], log: Log) -> dict[str, dict[str, float]]:
    """Every wire the contract allows on ``codes``: median payload bytes, encoding ms here, decoding ms on the
    server (the coders whose tables the export lacks left out, logged)."""
    from bottlefit.serve import codecs
    from bottlefit.serve.client import build_request
    from bottlefit.serve.head import load_tables

    contract = hm.contract
    wires: dict[str, dict[str, float]] = {}
    candidates = ["int8", *codecs.CODECS] if contract.quantized else ["fp32"]
    tables = None
    if any(w in ("entropy", "context") for w in candidates):
        try:
            tables = load_tables(hm.target, contract)
        except codecs.CodecError as e:
            log(f"entropy and context coders left out ({e})")
            candidates = [w for w in candidates if w not in ("entropy", "context")]
    for w in candidates:
        sizes, enc, dec = [], [], []
        for c in codes:
            t0 = time.thread_time_ns()
            body, hl, nbytes = build_request(contract, c, w, "bottleneck", tables)
            enc.append((time.thread_time_ns() - t0) / 1e6)
            sizes.append(nbytes)
            if w in codecs.CODECS:
                t0 = time.thread_time_ns()
                codecs.decode_frame(body[hl + 4 :], {contract.contract_id: contract}, lambda _c: tables)
                dec.append((time.thread_time_ns() - t0) / 1e6)
        wires[w] = {"bytes": float(np.median(sizes)), "encode_host_ms": float(statistics.median(enc)),
                    "decode_server_ms": float(statistics.median(dec)) if dec else 0.0}
    return wires


def _pick_wire(wire: str, wires: dict[str, dict[str, float]], headline_link: LinkProfile, head: str) -> str:
    """``--wire`` checked against what was measured; auto: the bench's rule, least device encoding (assumed, x the
    pi4 factor) + decoding + bytes at the headline link."""
    if wire == "auto":
        from bottlefit.bench.device import host_factor

        f = host_factor("pi4")
        return min(wires, key=lambda w: (f * wires[w]["encode_host_ms"] + wires[w]["decode_server_ms"]
                                         + headline_link.transfer_ms(wires[w]["bytes"]), w))
    if wire not in wires:
        raise UserError(f"--wire {wire}: not available for {head} (choose {', '.join(wires)} or auto)")
    return wire


def _rgb_sha(rgb: np.ndarray) -> str:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    return hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest()


# -- the run


@dataclass
class PaperOptions:
    out: Path
    sources: list[PaperSource] = field(default_factory=lambda: [PaperSource(c) for c in CHANNELS])
    boards: tuple[str, ...] = BOARDS
    links: list[LinkProfile] = field(default_factory=lambda: list(PROFILES.values()))
    images: int = 16
    jpeg_quality: int = 95
    wire: str = "auto"
    workdir: Path = Path("out/demo")
    headline_link: str = "lte"
    count: bool = True  # count under emulation (False: host x factor only, as without qemu)
    share_count: bool = False  # the first model's whole-model count stands for the others' (labelled)
    count_timeout: float = 900.0  # seconds the whole model's count may take (0: not counted)


def device_record(channels: int, dev: DeviceTimes, key: dict[str, Any] | None, counts: dict[str, float] | None,
                  full_note: str = "", head: dict[str, str] | None = None) -> dict[str, Any]:
    """One (model, board): each part's Figure, and the counts it came from with what they depend on (a later run
    into the same OUT re-predicts from these counts instead of counting again)."""
    figs = {k: v.to_dict() for k, v in vars(dev).items() if isinstance(v, Figure)}
    return {"channels": channels, "board": dev.board, **figs, "key": key, "counts": counts, "full_note": full_note,
            "head_file": dict(head or {})}


def repredict(r: dict[str, Any]) -> dict[str, Any]:
    """A result JSON's report again with the device-time model as it is now: every counted part re-predicted from
    its recorded counts, the host figures and bytes as measured then; nothing is run or counted."""
    from dataclasses import fields

    names = {f.name for f in fields(Measured)}
    by_channels = {int(x["channels"]): Measured(**{k: v for k, v in x.items() if k in names}) for x in r["models"]}
    links = [PROFILES[p["name"]] for p in r["links"]]
    rows, devices = [], []
    for d in r["devices"]:
        m = by_channels[int(d["channels"])]
        counts = d.get("counts")
        note = d.get("full_note", "")
        dev = from_counts(m, d["board"], counts, note) if counts else host_times(m, d["board"])
        devices.append(device_record(m.channels, dev, d.get("key"), counts, note, m.board_head(d["board"])))
        rows.extend(compose(m, dev, links))
    sources = [PaperSource(int(x["channels"]), Path(x["source"].removeprefix("checkpoint ")))
               if x["source"].startswith("checkpoint ") else PaperSource(int(x["channels"])) for x in r["models"]]
    out = assemble(sources, list(by_channels.values()), [Path(x["export"]) for x in r["models"]], devices, rows,
                   links, r["wall_s"])
    out["untrained"] = r.get("untrained", out["untrained"])
    out["models"] = r["models"]  # as measured (sources included)
    return out


def assemble(sources: Sequence[PaperSource], measured: Sequence[Measured], exports: Sequence[Path],
             devices: Sequence[dict[str, Any]], rows: list[dict[str, Any]], links: Sequence[LinkProfile],
             wall_s: float) -> dict[str, Any]:
    """The result JSON (what the report renders): the models, device figures, rows, ratios, headline, constants."""
    rs = ratios(rows)
    models = [{"source": src.describe(), "export": str(root), **asdict(m)}
              for src, m, root in zip(sources, measured, exports, strict=True)]
    return {
        "schema": SCHEMA, "paper": PAPER, "paper_cite": PAPER_CITE,
        "untrained": [s.describe() for s in sources if s.checkpoint is None],
        "models": models, "devices": list(devices), "rows": rows, "ratios": rs,
        "headline": headline(rs, model_label(sources)),
        "links": [{"name": p.name, "label": p.label, "rate_mbit": p.rate_mbit, "rtt_ms": p.rtt_ms} for p in links],
        "assumed": {"request_overhead_bytes": REQUEST_OVERHEAD_B, "response_bytes": RESPONSE_B, "threads": THREADS},
        "energy_constants": energy.constants(), "energy_citations": energy.citations(),
        "wall_s": wall_s,
    }


def run_paper(opts: PaperOptions, log: Log) -> dict[str, Any]:
    t0 = time.perf_counter()
    link = next((p for p in opts.links if p.name == opts.headline_link), opts.links[0])
    earlier = earlier_counts(opts.out / "paper.json")
    measured, exports, rows, devices = [], [], [], []
    first: tuple[int, Path, Measured] | None = None
    for src in opts.sources:
        root = export_model(src, opts.workdir, log)
        m, _, full, rgb0 = measure(root, src.channels, opts.images, opts.jpeg_quality, opts.wire, link, log)
        log(f"{src.channels} ch: JPEG q{m.jpeg_quality} {m.jpeg_bytes:.0f} B, wire {m.wire} {m.payload_bytes:.0f} B, "
            f"host ms: head {m.head_host_ms:.1f}, whole model {m.full_host_ms:.1f}, tail {m.tail_server_ms:.1f}")
        m.board_heads = default_heads(root, opts.boards)
        log(f"{src.channels} ch: heads counted per board (the profile's default): " + ", ".join(
            f"{b} {h['head']} ({h['runtime']})" for b, h in m.board_heads.items()))
        first = first or (src.channels, full, m)
        counted_full, note = full, ""
        if opts.share_count and first[1] != full:
            # the whole models differ only in the bottleneck's two convs: count the first one's (minutes less)
            counted_full = first[1]
            a, b = conv_macs(full), conv_macs(first[1])
            note = (f" [the {first[0]}-ch whole model's count: the two differ only in the bottleneck conv and the "
                    f"decoder's first conv, {a / 1e9:.3f} vs {b / 1e9:.3f} G MACs ({pct(a, b):+.2f}%)]")
        for board in opts.boards:
            key = count_key(m, board, sha256(counted_full) if counted_full != full else None)
            counts = None
            if opts.count:
                counts = reuse(earlier, key)
                wanted = {"head", "jpeg", *(["full"] if opts.count_timeout > 0 else [])}
                if counts is not None and not wanted <= set(counts):
                    counts = None  # a part missing then is tried again (the rest come from the cache)
                if counts is not None:
                    log(f"{src.channels} ch on {board}: the counts of {opts.out / 'paper.json'} (same artifacts)")
                else:
                    counts = count_parts(m, board, root / m.board_head(board)["head"], counted_full, rgb0, log,
                                         opts.count_timeout)
            dev = from_counts(m, board, counts, note) if counts is not None else host_times(m, board)
            devices.append(device_record(src.channels, dev, key if counts else None, counts, note,
                                         m.board_head(board)))
            rows.extend(compose(m, dev, opts.links))
        measured.append(m)
        exports.append(root)
    return assemble(opts.sources, measured, exports, devices, rows, opts.links, round(time.perf_counter() - t0, 1))


# -- the report


def _label(link: str) -> str:
    return PROFILES[link].label if link in PROFILES else link


def markdown(r: dict[str, Any]) -> str:
    """paper.md: the result JSON ``r`` (:func:`assemble`) as the report, section by section."""
    sections = (_md_intro, _md_mode_costs, _md_device_ms, _md_wires, _md_latency, _md_against_paper,
                _md_energy)
    return "\n".join(line for section in sections for line in section(r))


def _md_intro(r: dict[str, Any]) -> list[str]:
    """The headline, the paper cited, the models and what each basis of a figure means."""
    lines = [f"# bottlefit bench split --paper\n\n**{r['headline']}**\n"]
    lines.append(f"Against: {r['paper_cite']}.\n")
    if r["untrained"]:
        lines.append("**Untrained models** (" + "; ".join(r["untrained"]) + "): accuracy means nothing here; "
                     "latency, bytes and energy do.\n")
    else:
        lines.append("Models: " + "; ".join(m["source"] for m in r["models"]) + ". Random-weight checkpoints "
                     "(seed 0) unless their source says otherwise: accuracy is not reported; latency, bytes and "
                     "energy do not depend on the weights' training.\n")
    lines.append("Every figure is one of: **measured** (on this host, an x86 machine shared with other jobs: "
                 "the server's ms are a loaded CPU's, not an edge GPU's), **predicted** / **extrapolated** (guest "
                 "instructions counted under emulation on the board's core -> the device-time model "
                 "bottlefit.emulation.devicetime, whose own label says whether its IPC is fitted for that runtime, "
                 "borrowed from another (extrapolated) or still assumed), **assumed** (this host's ms x the board's "
                 "stated factor), **modelled** (network: RTT x 2 + framed bytes at the link's rate; energy: the "
                 "model below).\n")
    return lines


def _md_mode_costs(r: dict[str, Any]) -> list[str]:
    """Per model: the payloads, the contract head and the host/server ms behind each mode."""
    lines: list[str] = []
    lines.append("## What each mode costs, per model (the reasons for the gap)\n")
    lines.append("| channels | JPEG q B | split wire | payload B | raw RGB B | contract head | its host ms "
                 "| whole model host ms "
                 "| server ms split (measured) | server ms offload (measured) |\n|---:|---:|---|---:|---:|---|---:|"
                 "---:|---:|---:|")
    for m in r["models"]:
        w = m["wires"][m["wire"]]
        lines.append(f"| {m['channels']} | {m['jpeg_bytes']:.0f} (q{m['jpeg_quality']}) | {m['wire']} "
                     f"| {w['bytes']:.0f} | {m['raw_bytes']} | {m['head']} ({m['head_runtime']}) "
                     f"| {m['head_host_ms']:.2f} "
                     f"| {m['full_host_ms']:.1f} | {m['tail_server_ms'] + w['decode_server_ms']:.1f} "
                     f"| {m['offload_server_ms']:.1f} |")
    lines.append("\nPayload bytes and the head's host ms are measured on the wire contract's head (named above); "
                 "on the device each board runs, and is counted with, the head its board profile runs by default "
                 "(bottlefit.targets.rpi.profiles), named below. The export's other int8 heads put int8 codes on the "
                 "wire with the contract's scale and zero point (the board bundle's golden.json \"wire\"), so the "
                 "int8 payload is the same bytes; the compressed wires' bytes are the contract head's codes'.\n")
    return lines


def _md_device_ms(r: dict[str, Any]) -> list[str]:
    """Per model and board: each device-side part's ms with its basis, and the counts."""
    lines: list[str] = []
    lines.append("\nDevice ms per board (basis: how each was had):\n")
    lines.append("| channels | board | head (the board's default) | head ms | whole model ms | JPEG encode ms "
                 "| wire encode ms | head M insns | whole model M insns | JPEG M insns |\n"
                 "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for d in r["devices"]:
        def fig(k: str, d: dict[str, Any] = d) -> str:
            return f"{d[k]['value']:.1f} ({d[k]['basis']})"

        c = d.get("counts") or {}
        hi = f"{c['head'] / 1e6:.1f}" if "head" in c else "–"
        fi = f"{c['full'] / 1e6:.0f}" if "full" in c else "–"
        ji = f"{c['jpeg'] / 1e6:.1f}" if "jpeg" in c else "–"
        hf = d.get("head_file") or {}
        head = f"{hf['head']} ({hf['runtime']})" if hf else "–"
        lines.append(f"| {d['channels']} | {d['board']} | {head} | {fig('head')} | {fig('full')} "
                     f"| {fig('jpeg_encode')} | {fig('wire_encode')} | {hi} | {fi} | {ji} |")
    lines.append("\n" + "\n".join(f"- {d['board']} {d['channels']} ch: {d['full']['why']}; {d['head']['why']}; "
                                   f"{d['jpeg_encode']['why']}; {d['wire_encode']['why']}" for d in r["devices"]))
    return lines


def _md_wires(r: dict[str, Any]) -> list[str]:
    """Every wire measured: payload bytes, encoding and decoding ms."""
    lines: list[str] = []
    lines.append("\nEvery wire on these images (median payload B, encoding ms on this host, decoding ms on the "
                 "server): " + "; ".join(f"{m['channels']} ch: " + ", ".join(
                     f"{w} {f['bytes']:.0f} B {f['encode_host_ms']:.2f}+{f['decode_server_ms']:.2f} ms"
                     for w, f in m["wires"].items()) for m in r["models"]) + ". The split mode uses the wire "
                 "named in the first table (`--wire`, default auto: least device encoding + decoding + bytes at LTE).")
    return lines


def _md_latency(r: dict[str, Any]) -> list[str]:
    """One row per model, board, link and mode: device, network, server ms and the energy."""
    lines: list[str] = []
    lines.append("\n## Latency and energy per mode\n")
    lines.append("| channels | board | link | mode | device ms | network ms | server ms | end-to-end ms | payload B "
                 "| energy mJ (model) |\n|---:|---|---|---|---:|---:|---:|---:|---:|---:|")
    for x in r["rows"]:
        lines.append(f"| {x['channels']} | {x['board']} | {_label(x['link'])} | {x['mode']} | {x['device_ms']:.1f} "
                     f"({x['device_basis']}) | {x['network_ms']:.1f} | {x['server_ms']:.1f} | {x['latency_ms']:.1f} "
                     f"| {x['payload_bytes']:.0f} | {1e3 * x['energy_j']:.0f} |")
    return lines


def _md_against_paper(r: dict[str, Any]) -> list[str]:
    """Split against local and offload beside the paper's figures, without the server's ms, and the
    gap's parts."""
    lines: list[str] = []
    p = r["paper"]
    lines.append("\n## Split against local and offload, beside the paper\n")
    lines.append(f"| channels | board | link | latency vs local (paper {signed(p['latency_vs_local_pct'])}) "
                 f"| latency vs offload (paper {signed(p['latency_vs_offload_pct'])}) "
                 f"| energy vs local (paper {signed(p['energy_vs_local_pct'])}) "
                 f"| energy vs offload (paper {signed(p['energy_vs_offload_pct'])}) |\n"
                 "|---:|---|---|---:|---:|---:|---:|")
    for x in r["ratios"]:
        lines.append(f"| {x['channels']} | {x['board']} | {_label(x['link'])} | {signed(x['latency_vs_local_pct'])} "
                     f"| {signed(x['latency_vs_offload_pct'])} | {signed(x['energy_vs_local_pct'])} "
                     f"| {signed(x['energy_vs_offload_pct'])} |")
    lines.append("\nThe server's ms above are this x86 CPU's, one thread (CPU time). "
                 "With the server's ms left out (the bound a GPU edge server approaches), latency split vs local / "
                 "vs offload:\n")
    lines.append("| channels | board | link | vs local, no server ms | vs offload, no server ms |\n"
                 "|---:|---|---|---:|---:|")
    for x in r["ratios"]:
        if "latency_vs_local_pct_no_server" in x:
            lines.append(f"| {x['channels']} | {x['board']} | {_label(x['link'])} "
                         f"| {signed(x['latency_vs_local_pct_no_server'])} "
                         f"| {signed(x['latency_vs_offload_pct_no_server'])} |")
    lines.append("\n### Where split wins and loses against offload (the gap, from the figures above)\n")
    lines.extend(gap_lines(r))
    return lines


def _md_energy(r: dict[str, Any]) -> list[str]:
    """The energy model, its sources and the assumed bytes; the plots."""
    lines: list[str] = []
    lines.append("\n## The energy model (a model, not a measurement)\n")
    lines.append("Energy per inference = the board's busy watts x device ms + its idle watts x the wait (network + "
                 "server) + the radio: (alpha x rate + beta) while each direction transfers, tail watts while "
                 "connected and waiting. Frames are streamed over a kept-alive connection: each connection's "
                 "promotion and tail energy (below) is not in the per-inference figure. "
                 f"{r['energy_constants']['busy_power_rule']}. {r['energy_constants']['link_radio_note']}.\n")
    conn = sorted({(x["link"], x["energy_connection_j"]) for x in r["rows"] if x["mode"] != "local"})
    lines.append("Per connection (promotion + tail), not included above: " +
                 ", ".join(f"{_label(k)} {v:.2f} J" for k, v in conn) + ".\n")
    lines.append("Sources:\n\n" + "\n".join(f"- {c}" for c in r["energy_citations"]) + "\n")
    a = r["assumed"]
    lines.append(f"Assumed bytes around each payload: {a['request_overhead_bytes']} B of request headers, "
                 f"{a['response_bytes']} B of response; one inference thread on the device. Wall time "
                 f"{r['wall_s']} s.\n")
    lines.append("![latency](paper_latency.png)\n![energy](paper_energy.png)\n")
    return lines


def gap_lines(r: dict[str, Any], link: str = "lte") -> list[str]:
    """Per model and board at ``link``: split's saving on the link against offload's, and what it pays on the
    device and the server, so a gap to the paper can be traced to a part."""
    out = []
    for (c, b) in sorted({(x["channels"], x["board"]) for x in r["rows"]}, key=lambda k: (-k[0], k[1])):
        by = {x["mode"]: x for x in r["rows"] if (x["channels"], x["board"], x["link"]) == (c, b, link)}
        if len(by) < 3:
            continue
        s, of, lo = by["split"], by["offload"], by["local"]
        out.append(f"- {c} ch, {b}, {_label(link)}: the link costs split {s['network_ms']:.0f} ms for "
                   f"{s['payload_bytes']:.0f} B against offload's {of['network_ms']:.0f} ms for "
                   f"{of['payload_bytes']:.0f} B of JPEG ({s['network_ms'] - of['network_ms']:+.0f} ms); the device "
                   f"{s['device_ms']:.0f} ms (head + wire encoding) against {of['device_ms']:.0f} ms (JPEG encoding) "
                   f"({s['device_ms'] - of['device_ms']:+.0f} ms); the server {s['server_ms']:.0f} ms (tail) against "
                   f"{of['server_ms']:.0f} ms (whole model) ({s['server_ms'] - of['server_ms']:+.0f} ms). Local: "
                   f"{lo['device_ms']:.0f} ms on the device.")
    return out


def plots(r: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    colors = {"local": "#4c72b0", "offload": "#dd8452", "split": "#55a868"}
    groups = sorted({(x["channels"], x["board"]) for x in r["rows"]}, key=lambda g: (-g[0], g[1]))
    links = [p["name"] for p in r["links"]]
    for key, unit, scale, name in (("latency_ms", "end-to-end ms", 1.0, "paper_latency.png"),
                                   ("energy_j", "energy per inference, mJ (model)", 1e3, "paper_energy.png")):
        fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False, sharey=True)
        for ax, (c, b) in zip(axes[0], groups, strict=True):
            xs = np.arange(len(links))
            for k, mode in enumerate(MODES):
                vals = [next(x[key] for x in r["rows"] if (x["channels"], x["board"], x["link"], x["mode"])
                             == (c, b, link, mode)) * scale for link in links]
                ax.bar(xs + (k - 1) * 0.27, vals, 0.27, label=mode, color=colors[mode])
            ax.set_xticks(xs, [_label(link) for link in links])
            ax.set_yscale("log")
            ax.set_title(f"R152 v2 {c} ch, {b}")
        axes[0][0].set_ylabel(unit)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        plt.close(fig)
        out[name] = buf.getvalue()
    return out


def write_report(out: Path, r: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "paper.json", out / "paper.md"]
    atomic_write_text(paths[0], json.dumps(r, indent=1, sort_keys=True) + "\n")
    atomic_write_text(paths[1], markdown(r))
    try:
        images = plots(r)
    except ImportError as e:
        raise EnvironmentProblem(f"{e.name} not installed: pip install 'bottlefit[demo]' for the plots") from None
    for name, data in images.items():
        atomic_write_bytes(out / name, data)
        paths.append(out / name)
    return paths


__all__ = ["Basis", "Figure", "Measured", "DeviceTimes", "PaperOptions", "PaperSource", "compose", "ratios",
           "headline", "run_paper", "write_report", "PAPER"]
