"""``bottlefit bench split``: local vs. offloading vs. split, side by side in one run, over emulated links.

The orchestrator: it resolves the model (the demo's trained one unless an export or a checkpoint is given), builds
the whole model from the export's own fp32 head and tail (``full.onnx``), measures accuracy per mode in process,
starts the two ends of the link (:mod:`bottlefit.bench.peer`) inside the namespaces (:mod:`bottlefit.bench.links`),
runs every link with the modes interleaved image by image, and turns the records into the figures that
:mod:`bottlefit.bench.report` writes.
"""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.bench.device import (
    DEVICES,
    DeviceClass,
    DevicePlan,
    counts_board,
    default_heads,
    encode_ms,
    encoder_instructions,
)
from bottlefit.bench.links import LinkProfile, LinkSetup, Namespaces, open_links
from bottlefit.bench.peer import DeviceSpec, LinkSpec, ServerSpec, TritonSpec
from bottlefit.errors import EnvironmentProblem, UserError
from bottlefit.exporter.artifact import Precision, Role, Runtime
from bottlefit.models.card import ModelCard

Log = Callable[[str], None]
SCHEMA = "bottlefit.bench.split/1"


@dataclass
class BenchOptions:
    out: Path
    links: list[LinkProfile]
    quick: bool = False
    link_model: str = "auto"  # auto | netns | analytic
    images: int = 32
    repeats: int = 3
    jpeg_quality: int = 95
    wire: str = "auto"
    device: DeviceClass = DEVICES["host"]
    headline_link: str = "lte"
    export: Path | None = None
    checkpoint: Path | None = None
    workdir: Path = Path("out/demo")
    head: str | None = None
    accuracy_images: int = 1000
    triton: bool = False  # the split mode also through a real tritonserver (mode split_triton)
    device_timings: Path | None = None  # `bottlefit run-head --json` output from the board: the head's ms, measured


@dataclass
class Model:
    export: Path
    card: ModelCard
    source: str
    labels: str  # what top-1 is measured against


@dataclass
class Images:
    x: np.ndarray  # (N, 3, H, W) float32, normalized from rgb
    rgb: np.ndarray  # (N, H, W, 3) uint8: the model-sized crop the device holds
    labels: np.ndarray | None


# -- the model


def _fresh(export: Path, checkpoint: Path) -> bool:
    m = export / "onnx" / "manifest.json"
    return m.is_file() and (not checkpoint.is_file() or m.stat().st_mtime >= checkpoint.stat().st_mtime)


def demo_model(workdir: Path, log: Log) -> Path:
    """The demo's trained model exported for onnx (int8 head): the demo's own export where it is up to date, else
    trained (cached in the demo's work directory, as ``bottlefit demo`` does) and exported for onnx only."""
    from bottlefit import demo

    best = workdir / "student" / "best.pt"
    for cand in (workdir / "export", workdir / "bench-export"):
        if _fresh(cand, best):
            log(f"model: the demo's export {cand} (checkpoint {best})")
            return cand
    import torch

    from bottlefit.models import build
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import CalibrationOptions, ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions
    from bottlefit.training import mnist_splits

    workdir.mkdir(parents=True, exist_ok=True)
    _, card = build(demo.ARCH, {"bottleneck_channel": 4})
    data = mnist_splits(card, n_train=demo.N_TRAIN, n_val=demo.N_VAL)
    log(f"model: no up-to-date demo export in {workdir}: training (cached there) and exporting for onnx")
    best, _ = demo.train_model(workdir, data, stage_epochs=4, bottleneck_channel=4, log=log)
    calib = demo.write_npz(workdir / "calib.npz", torch.stack([data.train[i][0] for i in range(256)]))
    held = demo.write_npz(workdir / "heldout.npz", torch.stack([data.val[i][0] for i in range(200)]))
    out = workdir / "bench-export"
    export(ExportRequest(ModelSource(checkpoint=best), "onnx", out, OnnxOptions(int8=True),
                         CalibrationOptions(source=str(calib)),
                         ParityOptions(images=str(held), emulate=Emulate.parse("none"))), log=lambda m: None)
    return out


def resolve_model(opts: BenchOptions, log: Log) -> Model:
    from bottlefit.serve.contract import find_targets

    if opts.export is not None:
        root, source, labels = opts.export, f"export {opts.export}", "agreement with the local fp32 model"
    elif opts.checkpoint is not None:
        from bottlefit.pipeline.export import export
        from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
        from bottlefit.targets import Emulate
        from bottlefit.targets.onnx import OnnxOptions

        if not opts.checkpoint.is_file():
            raise UserError(f"{opts.checkpoint}: no such checkpoint")
        root = opts.out / "export"
        log(f"model: exporting {opts.checkpoint} for onnx (int8 head, built-in calibration photos) into {root}")
        export(ExportRequest(ModelSource(checkpoint=opts.checkpoint), "onnx", root, OnnxOptions(int8=True),
                             parity=ParityOptions(emulate=Emulate.parse("none"))), log=lambda m: None)
        source, labels = f"checkpoint {opts.checkpoint}", "agreement with the local fp32 model"
    else:
        root = demo_model(opts.workdir, log)
        source, labels = f"the demo's trained model ({root})", "MNIST labels (the demo's validation digits)"
    targets = find_targets(root)
    owner = next((t for t in targets if t.tail() is not None), None)
    if owner is None:
        raise UserError(f"{root}: no ONNX tail (tail.onnx); export with --target onnx")
    return Model(root, owner.card, source, labels)


def full_onnx(model: Model, dst: Path) -> Path:
    """The whole model as the export's own fp32 head.onnx followed by its tail.onnx, joined on the bottleneck."""
    import onnx
    from onnx import compose

    from bottlefit.serve.contract import find_targets

    owner = next(t for t in find_targets(model.export) if t.tail() is not None)
    tail = owner.tail()
    assert tail is not None
    head = next((a for a in owner.artifacts if a.role == Role.HEAD and a.precision == Precision.FP32
                 and a.runtime == Runtime.ONNXRUNTIME), None)
    if head is None:
        raise UserError(f"{owner.path}: no fp32 head.onnx to rebuild the whole model from")
    h, t = onnx.load(str(owner.path / head.file)), onnx.load(str(owner.path / tail.file))
    if h.ir_version != t.ir_version:
        t.ir_version = h.ir_version = min(h.ir_version, t.ir_version)
    full = compose.merge_models(h, t, io_map=[(h.graph.output[0].name, t.graph.input[0].name)])
    onnx.save(full, str(dst))
    return dst


# -- images and accuracy


def load_images(model: Model, count: int) -> Images:

    card = model.card
    labels: np.ndarray | None
    if model.labels.startswith("MNIST"):
        from bottlefit import demo
        from bottlefit.training import mnist_splits

        val = mnist_splits(card, n_train=demo.N_TRAIN, n_val=demo.N_VAL).val
        x, y = val.tensors  # type: ignore[attr-defined]
        x, labels = x[:count].numpy(), y[:count].numpy()
    else:
        from bottlefit.calibration.builtin import builtin_arrays

        arr, _ = builtin_arrays(card, "heldout")
        x, labels = np.asarray(arr, np.float32)[:count], None
    rgb = card.rgb8(x)
    return Images(card.normalize(rgb), rgb, labels)


def jpeg(rgb: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pick_wire(model: Model, opts: BenchOptions, codes: np.ndarray, log: Log) -> tuple[str, dict[str, Any]]:
    """The split mode's wire: ``--wire``, or (auto) the one with the least estimated cost per image at the headline
    link: device-side encoding + server-side decoding + the payload at the link's rate, on these images' codes; the
    device's encoding as bottlefit.bench.device.encode_ms says (on a board: the board's encoder counted under
    emulation and predicted; with --device-factor: this host's ms x the factor). Returns (wire, per-wire figures).
    """
    from bottlefit.serve import codecs
    from bottlefit.serve.client import build_request, pick_head
    from bottlefit.serve.head import load_tables

    target, contract = pick_head(model.export, opts.head)
    if not contract.quantized:
        return "fp32", {}
    wires = list(codecs.CODECS) if opts.triton else ["int8", *codecs.CODECS]  # Triton's ensemble takes frames
    try:
        tables = load_tables(target, contract)
    except codecs.CodecError as e:  # the fitted symbol models cannot be had: the coders that need them are out
        if opts.wire in ("entropy", "context"):
            raise UserError(f"--wire {opts.wire}: {e}") from None
        log(f"split wire: entropy and context coders left out ({e})")
        tables, wires = None, [w for w in wires if w not in ("entropy", "context")]
    link = next(p for p in opts.links if p.name == opts.headline_link)
    figures: dict[str, Any] = {}
    for w in wires:
        sizes, enc, dec = [], [], []
        for c in codes[:16]:
            t0 = time.perf_counter()
            body, hl, n = build_request(contract, c, w, "bottleneck", tables)
            enc.append((time.perf_counter() - t0) * 1e3)
            sizes.append(n)
            if w in codecs.CODECS:
                t0 = time.perf_counter()
                codecs.decode_frame(body[hl + 4 :], {contract.contract_id: contract}, lambda _c: tables)
                dec.append((time.perf_counter() - t0) * 1e3)
        host = statistics.median(enc)
        # on a board, the encoder counted under emulation (the wire asked for, or every candidate for auto)
        n = (encoder_instructions(str(opts.device.board), w, codes[0], log, target.path, contract.head)
             if counts_board(opts.device) and opts.wire in ("auto", w) else None)
        pred = encode_ms(opts.device, w, host, n)
        e, d = pred.ms, statistics.median(dec) if dec else 0.0
        figures[w] = {"bytes": float(np.mean(sizes)), "encode_ms_device": e, "encode_ms_host": host,
                      "encode_basis": str(pred.basis), "encode_instructions": n, "decode_ms_server": d,
                      "cost_ms": e + d + link.transfer_ms(float(np.mean(sizes)))}
    wire = opts.wire if opts.wire != "auto" else min(figures, key=lambda w: (figures[w]["cost_ms"], w))
    why = f"auto: least device encode + decode + bytes at {link.label}" if opts.wire == "auto" else "--wire"
    log(f"split wire ({why}): " + ", ".join(
        f"{w} {f['bytes']:.0f} B {f['encode_ms_device']:.1f}+{f['decode_ms_server']:.1f} ms -> {f['cost_ms']:.1f} ms"
        for w, f in figures.items()) + f"; using {wire}")
    return wire, figures


def accuracy(model: Model, full: Path, imgs: Images, opts: BenchOptions, log: Log) -> dict[str, Any]:
    """Top-1 per mode on the accuracy images, in process (the same artifacts the bench runs): local fp32 model,
    the server's model on JPEG qN of the crop, and the device's head artifact -> its contract's codes -> tail."""
    from bottlefit.bench.service import decode_jpeg
    from bottlefit.runtimes import get_runner
    from bottlefit.serve.client import pick_head
    from bottlefit.serve.contract import find_targets
    from bottlefit.serve.head import HeadCodes

    card = model.card
    runner = get_runner("onnxruntime", full, num_threads=1)
    fin, fout = runner.input_names[0], runner.output_names[0]
    owner = next(t for t in find_targets(model.export) if t.tail() is not None)
    tail_art = owner.tail()
    assert tail_art is not None
    tail = get_runner("onnxruntime", owner.path / tail_art.file, num_threads=1)
    target, contract = pick_head(model.export, opts.head)
    head = HeadCodes(target, contract)
    local, off, spl, sizes = [], [], [], []
    codes_all = []
    for i in range(len(imgs.x)):
        local.append(int(np.argmax(runner.infer({fin: imgs.x[i : i + 1]})[fout])))
        j = jpeg(imgs.rgb[i], opts.jpeg_quality)
        sizes.append(len(j))
        xj = card.normalize(decode_jpeg(j, card)[None])
        off.append(int(np.argmax(runner.infer({fin: xj})[fout])))
        codes = head(imgs.x[i : i + 1])[0]
        codes_all.append(codes)
        z = contract.dequantize(codes[None]) if contract.quantized else codes[None]
        spl.append(int(np.argmax(tail.infer({tail.input_names[0]: z.astype(np.float32)})[tail.output_names[0]])))
    ref = imgs.labels if imgs.labels is not None else np.asarray(local)

    def top1(pred: list[int]) -> float:
        return 100.0 * float(np.mean(np.asarray(pred) == ref[: len(pred)]))

    wire, wire_figures = pick_wire(model, opts, np.stack(codes_all[:16]), log)
    return {"images": len(imgs.x), "against": model.labels, "local": top1(local), "offload": top1(off),
            "split": top1(spl), "jpeg_quality": opts.jpeg_quality, "jpeg_bytes_mean": float(np.mean(sizes)),
            "head": f"{contract.target}/{contract.head}", "head_runtime": contract.runtime, "wire": wire,
            "wires": wire_figures}


# -- the two ends of the link


class Peer:
    """One end (``server`` or ``device``) as a child process speaking JSON lines; stderr goes to a log file."""

    def __init__(self, role: str, spec: ServerSpec | DeviceSpec, run_dir: Path, prefix: list[str], logs: Path,
                 ) -> None:
        self.role, self.shown_log = role, logs / f"{role}.log"  # where a failed run keeps it
        spec_path = run_dir / f"{role}.json"
        spec_path.write_text(spec.to_json())
        self.log_path = run_dir / f"{role}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "bottlefit.bench.peer", role, str(spec_path)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
        self.buf = b""

    def read(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EnvironmentProblem(f"bench {self.role} gave no answer within {timeout_s:.0f} s "
                                         f"(log: {self.shown_log})")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                    raise EnvironmentProblem(f"bench {self.role} stopped: {tail[0]} (log: {self.shown_log})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if "error" in msg:
            raise EnvironmentProblem(f"bench {msg['error']} (log: {self.shown_log})")
        return msg

    def ask(self, cmd: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        return self.read(timeout_s)

    def close(self, graceful: bool) -> None:
        """``graceful``: ask it to stop and wait; else (an error, Ctrl-C) terminate it now, kill it if it lingers."""
        try:
            if graceful and self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                self.proc.stdin.close()
            elif self.proc.poll() is None:
                self.proc.terminate()
            self.proc.wait(timeout=15 if graceful else 5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=5)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the namespaces and the peers are cleaned up either way."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def triton_spec(model: Model, run_dir: Path, log: Log) -> TritonSpec:
    """The Triton server the server peer starts: the unpacked wheel and the models' environment (fetched here,
    where the package index is reachable) and the repository written from the export (python-backend tail)."""
    from bottlefit.serve.triton import RepositoryOptions, TailBackend, write_triton_repository
    from bottlefit.serve.triton_server import ensure_server

    install = ensure_server(log)
    repo = run_dir / "triton-repo"
    write_triton_repository(model.export, repo, options=RepositoryOptions(tail_backend=TailBackend.PYTHON))
    log(f"split_triton: tritonserver ({install.root.name}) loads the ensemble written from {model.export}")
    return TritonSpec(root=str(install.root), env=str(install.env), repo=str(repo),
                      log=str(run_dir / "tritonserver.log"))


def run_links(model: Model, full: Path, run_dir: Path, opts: BenchOptions, wire: str, log: Log,
              ) -> tuple[LinkSetup, dict[str, Any]]:
    """Every link with all three modes: per link, per request, the device's and the relay's records."""
    from bottlefit.bench.peer import MODES
    from bottlefit.bench.service import full_model_name
    from bottlefit.serve.contract import tail_model_name

    images = run_dir / "images.npz"
    modes = [*MODES, "split_triton"] if opts.triton else list(MODES)
    with open_links(opts.link_model) as links:
        setup = links.setup if isinstance(links, Namespaces) else links
        log(f"links: {setup.describe()}")
        srv_prefix = links.exec_prefix("srv") if isinstance(links, Namespaces) else []
        dev_prefix = links.exec_prefix("dev") if isinstance(links, Namespaces) else []
        server = Peer("server", ServerSpec(export=str(model.export), full=str(full), card=model.card,
                                           triton=triton_spec(model, run_dir, log) if opts.triton else None,
                                           bind=setup.srv_addr, relay_delays=setup.relay_delays,
                                           links=tuple(LinkSpec(p.name, p.rtt_ms, p.rate_mbit) for p in opts.links)),
                      run_dir, srv_prefix, opts.out / "bench-logs")
        device: Peer | None = None
        graceful = False
        try:
            # both ends start at once (imports and model loading take seconds each)
            device = Peer("device", DeviceSpec(export=str(model.export), full=str(full), images=str(images),
                                               srv_addr=setup.srv_addr, iface=setup.dev_if or None,
                                               split_model=tail_model_name(model.card),
                                               full_model=full_model_name(model.card), wire=wire, head=opts.head,
                                               jpeg_quality=opts.jpeg_quality, modes=tuple(modes)),
                          run_dir, dev_prefix, opts.out / "bench-logs")
            ready = server.read(180)
            if ready["split_model"] != tail_model_name(model.card):
                raise EnvironmentProblem(f"the tail server serves {ready['split_model']!r}, not "
                                         f"{tail_model_name(model.card)!r}")
            device.read(180)
            per_link: dict[str, Any] = {}
            for p in opts.links:
                if isinstance(links, Namespaces):
                    links.apply(p)
                ports = {m: ready["ports"][f"{p.name}/{m}"] for m in modes if m != "local"}
                # warm-up: connections, first-call allocations, ARP; recorded by nobody. Its time (all three
                # modes on one image) bounds how long the measured loop may take.
                t0 = time.perf_counter()
                device.ask({"cmd": "run", "ports": ports, "images": 1, "repeats": 1}, 300)
                server.ask({"cmd": "take"}, 30)
                budget = 120 + 3 * (time.perf_counter() - t0) * opts.images * opts.repeats
                t0 = time.perf_counter()
                res = device.ask({"cmd": "run", "ports": ports, "images": opts.images, "repeats": opts.repeats},
                                 budget)["results"]
                recs = server.ask({"cmd": "take"}, 30)["records"]
                log(f"  {p.label:6s} {p.rate_mbit:g} Mbit/s, RTT {p.rtt_ms:g} ms: {len(res)} requests in "
                    f"{time.perf_counter() - t0:.1f} s")
                per_link[p.name] = {"device": res, "relay": recs}
            graceful = True
        finally:
            if device is not None:
                device.close(graceful)
            server.close(graceful)
    return setup, per_link


# -- figures


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


FRAMING = {"offload": 4, "split_bytes": 4, "split_tensor": 0}  # BYTES elements carry a u32 length each


def _framed(nbytes: int) -> int:
    """TCP payload bytes with their frames' headers (Ethernet + IPv4 + TCP with timestamps), for the analytic model."""
    from bottlefit.bench.relay import FRAME_HEADERS, MSS

    return nbytes + FRAME_HEADERS * -(-nbytes // MSS)


def analyse(setup: LinkSetup, per_link: dict[str, Any], opts: BenchOptions, wire: str,
            cost: DevicePlan | None = None) -> dict[str, Any]:
    """Per link and mode the medians; the device's share of each request is ``cost.ms`` (this host's measured ms,
    x a factor, or the board's counted-and-predicted ms)."""
    from bottlefit.serve import codecs

    cost = cost or DevicePlan(opts.device)
    split_framing = FRAMING["split_bytes"] if wire in codecs.CODECS else FRAMING["split_tensor"]
    rows, checks = [], []
    for p in opts.links:
        dev, relay = per_link[p.name]["device"], per_link[p.name]["relay"]
        for mode in ("local", "offload", "split", "split_triton"):
            recs = [r for r in dev if r["mode"] == mode]
            if mode == "split_triton" and not recs:
                continue
            ex = relay.get(f"{p.name}/{mode}", []) if mode != "local" else []
            figs = _request_figures(setup, p, mode, recs, ex, cost)
            if mode != "local":
                framing = FRAMING["offload"] if mode == "offload" else split_framing
                checks.append(_payload_check(p.name, mode, recs, ex, framing))
            rows.append(_mode_row(p, mode, recs, figs, cost))
    return {"rows": rows, "checks": checks}


@dataclass
class _Figures:
    """One link and mode's per-request figures (the successful requests'), before their medians."""

    e2e: list[float] = field(default_factory=list)  # end-to-end ms: the device's share + the network's
    server_ms: list[float] = field(default_factory=list)
    link_bytes: list[int] = field(default_factory=list)  # bytes on the link, frames' headers included
    link_model: list[float] = field(default_factory=list)  # ms the link profile alone costs the request


def _request_figures(setup: LinkSetup, p: LinkProfile, mode: str, recs: list[dict[str, Any]],
                     ex: list[dict[str, Any]], cost: DevicePlan) -> _Figures:
    """Each successful request's figures, paired with its relay record where there is one per request."""
    figs = _Figures()
    # one relay record per request, in order (a retried request has more: then none are paired)
    paired = dict(enumerate(ex)) if len(ex) == len(recs) else {}
    for k, r in enumerate(recs):
        if not r.get("ok"):
            continue
        x = paired.get(k)
        net = r["net_ms"]
        if mode != "local" and setup.kind == "analytic" and x is not None:
            # what loopback measured, plus the link: the handshake's and the request's round trips and
            # each direction's bytes at the profile's rate
            up, down = _framed(x["up_bytes"]), _framed(x["down_bytes"])
            net += 2 * p.rtt_ms + p.transfer_ms(up) + p.transfer_ms(down)
        figs.e2e.append(cost.ms(mode, r["device_ms"]) + net)
        if x is not None:
            figs.server_ms.append(x["server_ms"])
            # what the profile alone costs this request (both round trips, each direction's frames at the
            # rate): the measured network ms minus this and the server ms is the stack's own overhead
            figs.link_model.append(2 * p.rtt_ms + p.transfer_ms(_framed(x["up_bytes"]))
                                   + p.transfer_ms(_framed(x["down_bytes"])))
            if setup.kind == "analytic" or r.get("link_bytes") is None:
                figs.link_bytes.append(_framed(x["up_bytes"]) + _framed(x["down_bytes"]))
            else:
                figs.link_bytes.append(r["link_bytes"])
    return figs


def _payload_check(link: str, mode: str, recs: list[dict[str, Any]], ex: list[dict[str, Any]],
                   framing: int) -> dict[str, Any]:
    """Whether the relay saw, per request, the binary bytes the client says it sent (+ the codec's framing)."""
    matched = len(ex) == len(recs)
    mism = [k for k, r in enumerate(recs) if matched and ex[k]["binary_bytes"] != r["payload_bytes"] + framing]
    return {"link": link, "mode": mode, "requests": len(recs), "relay_records": len(ex),
            "payload_matches_relay": matched and not mism, "framing_bytes": framing,
            "client_payload_bytes": [r["payload_bytes"] for r in recs],
            "relay_binary_bytes": [x["binary_bytes"] for x in ex]}


def _mode_row(p: LinkProfile, mode: str, recs: list[dict[str, Any]], figs: _Figures,
              cost: DevicePlan) -> dict[str, Any]:
    """One report row: the link and mode's medians (NaN / 0 where no request succeeded)."""
    ok = [r for r in recs if r.get("ok")]
    e2e = figs.e2e
    return {
        "mode": mode, "link": p.name, "rate_mbit": p.rate_mbit, "rtt_ms": p.rtt_ms,
        "requests": len(recs), "failed": len(recs) - len(ok),
        "latency_ms_median": statistics.median(e2e) if e2e else float("nan"),
        "latency_ms_p95": _pct(e2e, 95),
        "device_ms_median": statistics.median([cost.ms(mode, r["device_ms"]) for r in ok]) if ok
        else float("nan"),
        "device_basis": str(cost.basis(mode)), "device_why": cost.why(mode),
        "device_ms_host_median": statistics.median([r["device_ms"] for r in ok]) if ok else float("nan"),
        "network_ms_median": statistics.median([e - cost.ms(mode, r["device_ms"])
                                                for e, r in zip(e2e, ok, strict=True)])
        if ok else float("nan"),
        "payload_bytes_median": statistics.median([r["payload_bytes"] for r in ok]) if ok else 0,
        "link_bytes_median": statistics.median(figs.link_bytes) if figs.link_bytes else 0,
        "server_ms_median": statistics.median(figs.server_ms) if figs.server_ms else 0.0,
        "link_model_ms_median": statistics.median(figs.link_model) if figs.link_model else 0.0,
        "top1_ids": [(r["image"], r["top1"]) for r in ok],
    }


def _row(rows: list[dict[str, Any]], mode: str, link: str) -> dict[str, Any]:
    return next(r for r in rows if r["mode"] == mode and r["link"] == link)


def ratios(rows: list[dict[str, Any]], links: list[LinkProfile]) -> list[dict[str, Any]]:
    """Per link, split's median latency against local's and offload's (same run), as % change; and its payload."""
    out = []
    for p in links:
        s, lo, of = _row(rows, "split", p.name), _row(rows, "local", p.name), _row(rows, "offload", p.name)
        out.append({"link": p.name,
                    "split_vs_local_pct": 100.0 * (s["latency_ms_median"] / lo["latency_ms_median"] - 1.0),
                    "split_vs_offload_pct": 100.0 * (s["latency_ms_median"] / of["latency_ms_median"] - 1.0),
                    "payload_smaller_pct": 100.0 * (1.0 - s["payload_bytes_median"] / of["payload_bytes_median"])})
    return out


def headline(result: dict[str, Any]) -> str:
    link = result["headline_link"]
    rows, acc = result["rows"], result["accuracy"]
    s, lo, of = _row(rows, "split", link), _row(rows, "local", link), _row(rows, "offload", link)

    def signed(v: float) -> str:
        return f"{'−' if v < 0 else '+'}{abs(v):.1f}%"

    def change(a: float, b: float) -> str:
        return signed(100.0 * (a / b - 1.0))

    smaller = 100.0 * (1 - s["payload_bytes_median"] / of["payload_bytes_median"])
    d = acc["split"] - acc["offload"]
    label = next(p["label"] for p in result["links"] if p["name"] == link)
    return (f"{label}, device {result['device']['name']} ({result['device']['label']}): split vs local "
            f"{change(s['latency_ms_median'], lo['latency_ms_median'])} latency, split vs offload "
            f"{change(s['latency_ms_median'], of['latency_ms_median'])}, payload {smaller:.1f}% smaller than JPEG "
            f"q{acc['jpeg_quality']} at Δtop-1 {signed(d)}")


def device_plan(model: Model, full: Path, imgs: Images, acc: dict[str, Any], opts: BenchOptions, log: Log,
                ) -> DevicePlan:
    """The device's milliseconds per mode (bottlefit.bench.device): on a Pi, the split mode's head artifact, the
    whole model, JPEG encoding of the first crop and the chosen wire's encoder, counted under emulation on its core."""
    from bottlefit.bench.device import plan, read_timings
    from bottlefit.emulation.arm64 import EmulationUnavailable
    from bottlefit.serve.client import pick_head

    if opts.device.factor is not None or opts.device.board is None:
        return DevicePlan(opts.device)
    from bottlefit.serve.head import HeadCodes

    target, contract = pick_head(model.export, opts.head)
    wire_fig = acc["wires"].get(acc["wire"], {})
    codes = HeadCodes(target, contract)(imgs.x[:1])[0]  # the first image's, what the encoder is counted on
    head, head_runtime = device_head(model.export, str(opts.device.board), opts.head, target.path / contract.head,
                                     contract.runtime)
    try:
        return plan(opts.device, head=head, head_runtime=head_runtime,
                    head_precision="int8" if contract.quantized else "fp32", full=full, rgb=imgs.rgb[0],
                    jpeg_quality=opts.jpeg_quality,
                    encode_instructions=encoder_instructions(opts.device.board, acc["wire"], codes, log, target.path,
                                                             contract.head),
                    encode_host_ms=float(wire_fig.get("encode_ms_host", 0.0)),
                    timings=read_timings(opts.device_timings) if opts.device_timings else None, log=log)
    except EmulationUnavailable as e:
        raise EmulationUnavailable(f"{e} (--board {opts.device.name} counts the device's work under arm64 "
                                   "emulation; without it pass your measured --device-factor)") from None


def device_head(export: Path, board: str, asked: str | None, contract_head: Path, contract_runtime: str,
                ) -> tuple[Path, str]:
    """The head the board runs: the one asked for with --head, else the head the board's profile runs by default
    on this export's rpi/ bundle (ncnn int8 on every Pi today), else the wire contract's head."""
    if asked is None:
        root = export.parent if export.name == "rpi" else export
        chosen = default_heads(root, [board]).get(board)
        if chosen is not None:
            return root / chosen["head"], chosen["runtime"]
    return contract_head, contract_runtime


def device_record(device: DeviceClass, dev: DevicePlan) -> dict[str, Any]:
    """report.json's "device": what the device's milliseconds are and how each mode's was had."""
    if dev.counted:
        how = ("each mode's device compute counted under qemu arm64 emulation on the board's core and predicted "
               "by the device-time model (bottlefit/emulation/boards.json); see parts")
        label = "counted under emulation, predicted"
    elif device.name == "host":
        how, label = "device-side compute measured on this host", "measured here"
    else:
        how = "device-side compute measured on this host, multiplied by the factor (assumed)"
        label = f"x{device.factor:g} assumed"
    return {"name": device.name, "factor": device.factor, "basis": device.basis, "how": how, "label": label,
            "board": device.board, "modes": {m: {"basis": str(dev.basis(m)), "why": dev.why(m)}
                                             for m in ("local", "offload", "split")}, **dev.to_dict()}


def run_bench(opts: BenchOptions, log: Log) -> dict[str, Any]:
    """The whole ``bench split`` run; returns the JSON result (the report writes it)."""
    t_start = time.perf_counter()
    if opts.headline_link not in {p.name for p in opts.links}:
        raise UserError(f"--headline-link {opts.headline_link!r} is not among --links "
                        f"({', '.join(p.name for p in opts.links)})")
    model = resolve_model(opts, log)
    run_dir = Path(tempfile.mkdtemp(prefix="bottlefit-bench-"))
    try:
        with _sigterm_as_interrupt():
            full = full_onnx(model, run_dir / "full.onnx")
            log(f"model: {model.source}; the whole model for local and offload: its fp32 head.onnx + tail.onnx "
                f"({full.stat().st_size / 1e6:.1f} MB)")
            n_acc = max(opts.images, opts.accuracy_images)
            acc_imgs = load_images(model, n_acc)
            if len(acc_imgs.x) < 1:
                raise UserError(f"{model.export}: no images to run")
            acc = accuracy(model, full, acc_imgs, opts, log)
            log(f"accuracy on {acc['images']} images ({acc['against']}): local {acc['local']:.1f}%, offload "
                f"(JPEG q{opts.jpeg_quality}) {acc['offload']:.1f}%, split ({acc['head']}) {acc['split']:.1f}%")
            n = min(opts.images, len(acc_imgs.x))
            np.savez(run_dir / "images.npz", x=acc_imgs.x[:n], rgb=acc_imgs.rgb[:n])
            opts.images = n
            dev = device_plan(model, full, acc_imgs, acc, opts, log)
            setup, per_link = run_links(model, full, run_dir, opts, acc["wire"], log)
        figures = analyse(setup, per_link, opts, acc["wire"], dev)
        labels = acc_imgs.labels
        for r in figures["rows"]:
            ids = r.pop("top1_ids")
            r["top1_bench_images"] = (100.0 * float(np.mean([labels[i] == t for i, t in ids]))
                                      if labels is not None and ids else None)
        result: dict[str, Any] = {
            "schema": SCHEMA, "quick": opts.quick, "model": {"source": model.source, "export": str(model.export),
                                                            "arch": model.card.arch},
            "device": device_record(opts.device, dev),
            "link_setup": setup.to_dict(), "link_setup_text": setup.describe(),
            "links": [{"name": p.name, "label": p.label, "rate_mbit": p.rate_mbit, "rtt_ms": p.rtt_ms,
                       "loss_pct": p.loss_pct} for p in opts.links],
            "images": n, "repeats": opts.repeats, "jpeg_quality": opts.jpeg_quality, "wire": acc["wire"],
            "accuracy": acc, "headline_link": opts.headline_link, **figures,
        }
        result["ratios"] = ratios(result["rows"], opts.links)
        result["headline"] = headline(result)
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        result["raw"] = per_link
        return result
    except BaseException:
        # the peers' logs outlive a failed run: the error line names them
        logs = opts.out / "bench-logs"
        for f in run_dir.glob("*.log"):
            logs.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, logs / f.name)
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


__all__ = ["BenchOptions", "DEVICES", "run_bench", "headline"]
