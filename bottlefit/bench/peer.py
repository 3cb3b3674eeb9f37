"""The two ends of an emulated link, each a process (inside its network namespace where there are namespaces):

- ``server``: ``bottlefit serve``'s server for the tail (split), the whole-model service (offload) and one relay
  per (link, mode) in front of them; answers ``take`` with the relays' per-request records.
- ``device``: the device side: the whole model (local), JPEG encoding (offload) and serve's real client with the
  head artifact (split); answers ``run`` with one record per request.

Both speak JSON lines on stdin/stdout with the orchestrator (:mod:`bottlefit.bench.split`) and end on ``quit`` or
end of input, so a killed orchestrator never leaves them behind. Logs go to stderr.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.models.card import ModelCard

MODES = ("local", "offload", "split")


@dataclass(frozen=True)
class LinkSpec:
    """One emulated link as the server's relays shape it."""

    name: str
    rtt_ms: float
    rate_mbit: float


@dataclass(frozen=True)
class TritonSpec:
    """The tritonserver the server peer starts: the unpacked wheel, the models' environment, the repository."""

    root: str
    env: str
    repo: str
    log: str


@dataclass(frozen=True)
class ServerSpec:
    """What the ``server`` peer is started with, written by :mod:`bottlefit.bench.split` as ``server.json``."""

    export: str
    full: str  # full.onnx, the whole model
    card: ModelCard
    bind: str  # the address the relays listen on
    relay_delays: bool  # the relays add the links' delay and rate (no namespaces to shape them)
    links: tuple[LinkSpec, ...]
    triton: TritonSpec | None = None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "card": self.card.to_dict(),
                           "links": [asdict(x) for x in self.links]})

    @classmethod
    def from_json(cls, text: str) -> ServerSpec:
        d = json.loads(text)
        return cls(export=d["export"], full=d["full"], card=ModelCard.from_dict(d["card"]), bind=d["bind"],
                   relay_delays=bool(d["relay_delays"]), links=tuple(LinkSpec(**x) for x in d["links"]),
                   triton=TritonSpec(**d["triton"]) if d.get("triton") else None)


@dataclass(frozen=True)
class DeviceSpec:
    """What the ``device`` peer is started with, written by :mod:`bottlefit.bench.split` as ``device.json``."""

    export: str
    full: str
    images: str  # images.npz: x (normalized) and rgb (the model-sized crops)
    srv_addr: str
    split_model: str  # the tail's model name on the protocol
    full_model: str
    wire: str
    jpeg_quality: int
    iface: str | None = None  # the device-side interface whose byte counters are read; None: not counted
    head: str | None = None
    modes: tuple[str, ...] = field(default=MODES)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "modes": list(self.modes)})

    @classmethod
    def from_json(cls, text: str) -> DeviceSpec:
        d = json.loads(text)
        return cls(**{**d, "jpeg_quality": int(d["jpeg_quality"]), "modes": tuple(d.get("modes") or MODES)})


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _commands() -> Any:
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            return
        yield cmd


def serve_side(spec: ServerSpec) -> None:
    from bottlefit.bench.relay import Relays
    from bottlefit.bench.service import FullModel, FullModelServer
    from bottlefit.serve.server import ServeOptions, Server

    # one request at a time: no batching delay, one worker, one thread (the same for both servers)
    tail = Server(Path(spec.export), ServeOptions(host="127.0.0.1", http_port=0, grpc_port=0, max_delay_ms=0.0,
                                                     workers=1, threads=1)).start()
    full = FullModelServer(FullModel(Path(spec.full), spec.card, threads=1)).start()
    backends = [("offload", full.port), ("split", tail.http_port)]
    triton = None
    if spec.triton is not None:
        from bottlefit.serve.triton_server import TritonInstall, TritonServer

        t = spec.triton
        triton = TritonServer(TritonInstall(Path(t.root), Path(t.env)), Path(t.repo), Path(t.log))
        backends.append(("split_triton", triton.start().http_port))
    relays = Relays()
    try:
        ports: dict[str, int] = {}
        for link in spec.links:
            delays = spec.relay_delays
            rate = link.rate_mbit * 1e6 if delays else 0.0
            one_way = link.rtt_ms / 2e3 if delays else 0.0
            # the handshake: one RTT, and SYN + SYN-ACK (74 B each) at the link's rate
            handshake = link.rtt_ms / 1e3 + 2 * 74 * 8 / rate if delays else 0.0
            for mode, port in backends:
                name = f"{link.name}/{mode}"
                ports[name] = relays.add(name, spec.bind, ("127.0.0.1", port), one_way, handshake, rate)
        _say({"ready": True, "ports": ports, "split_model": tail.model.name, "full_model": full_name(spec.card)})
        for cmd in _commands():
            if cmd["cmd"] == "take":
                _say({"records": {n: [x.to_dict() for x in xs] for n, xs in relays.take().items()}})
    finally:
        relays.close()
        full.stop()
        tail.stop()
        if triton is not None:
            triton.stop()


def full_name(card: ModelCard) -> str:
    from bottlefit.bench.service import full_model_name

    return full_model_name(card)


class Counter:
    """The device-side interface's byte counters (both directions: what crossed the link), or None."""

    def __init__(self, iface: str | None) -> None:
        self.paths = [Path(f"/sys/class/net/{iface}/statistics/{k}_bytes") for k in ("rx", "tx")] if iface else []

    def read(self) -> int | None:
        if not self.paths:
            return None
        return sum(int(p.read_text()) for p in self.paths)


class Device:
    def __init__(self, spec: DeviceSpec) -> None:
        from bottlefit.runtimes import get_runner

        self.spec = spec
        data = np.load(spec.images)
        self.x, self.rgb = data["x"], data["rgb"]
        self.full = get_runner("onnxruntime", Path(spec.full), num_threads=1)
        self.full_in, self.full_out = self.full.input_names[0], self.full.output_names[0]
        self.counter = Counter(spec.iface)
        self.clients: dict[str, Any] = {}

    def client(self, port: int) -> Any:
        from bottlefit.serve.client import Client

        key = str(port)
        if key not in self.clients:
            self.clients[key] = Client(Path(self.spec.export), f"http://{self.spec.srv_addr}:{port}",
                                       model=self.spec.split_model, wire=self.spec.wire,
                                       head=self.spec.head, retries=2, timeout_s=60.0, topk=1)
        return self.clients[key]

    def local(self, i: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        y = self.full.infer({self.full_in: self.x[i : i + 1]})[self.full_out]
        ms = (time.perf_counter() - t0) * 1e3
        return {"ok": True, "device_ms": ms, "net_ms": 0.0, "payload_bytes": 0, "top1": int(np.argmax(y[0]))}

    def offload(self, i: int, port: int) -> dict[str, Any]:
        from PIL import Image

        from bottlefit.bench.service import request_body
        from bottlefit.serve.client import RequestFailed, logits_of, post

        url = f"http://{self.spec.srv_addr}:{port}/v2/models/{self.spec.full_model}/infer"
        t0 = time.perf_counter()
        buf = io.BytesIO()
        Image.fromarray(self.rgb[i]).save(buf, format="JPEG", quality=self.spec.jpeg_quality)
        jpeg = buf.getvalue()
        body, hl = request_body(jpeg)
        t1 = time.perf_counter()
        rec: dict[str, Any] = {"device_ms": (t1 - t0) * 1e3, "payload_bytes": len(jpeg)}
        for attempt in range(3):
            t1 = time.perf_counter()
            try:
                resp, binary = post(url, body, hl, 60.0)
            except RequestFailed as e:
                rec.update(ok=False, error=str(e), attempts=attempt + 1)
                if not e.retryable:
                    return rec
                continue
            rec["net_ms"] = (time.perf_counter() - t1) * 1e3
            rec.update(ok=True, attempts=attempt + 1, top1=int(np.argmax(logits_of(resp, binary)[0])),
                       server_reported_ms=float((resp.get("parameters") or {}).get("server_ms", 0.0)))
            return rec
        return rec

    def split(self, i: int, port: int) -> dict[str, Any]:
        client = self.client(port)
        t0 = time.perf_counter()
        r = client.run_one(str(i), self.x[i])
        total = (time.perf_counter() - t0) * 1e3
        rec: dict[str, Any] = {"ok": r.ok, "attempts": r.attempts, "payload_bytes": r.coded_bytes,
                               "head_ms": r.head_ms, "device_ms": max(0.0, total - r.round_trip_ms),
                               "net_ms": r.round_trip_ms, "server_reported_ms": r.server_ms}
        if r.ok:
            rec["top1"] = int(r.topk[0][0])
        else:
            rec["error"] = r.error
        return rec

    def run(self, cmd: dict[str, Any]) -> list[dict[str, Any]]:
        ports, out = cmd["ports"], []
        pending: list[tuple[dict[str, Any], int | None]] = []  # networked request, counter at its start
        n = len(self.x) if cmd.get("images") is None else min(int(cmd["images"]), len(self.x))
        modes = self.spec.modes
        for rep in range(int(cmd.get("repeats", 1))):
            for i in range(n):
                # the modes in a rotating order, so no mode always runs right after another
                k = (i + rep) % len(modes)
                for mode in modes[k:] + modes[:k]:
                    c = self.counter.read() if mode != "local" else None
                    if mode == "local":
                        rec = self.local(i)
                    elif mode == "offload":
                        rec = self.offload(i, ports["offload"])
                    else:  # split, split_triton: the same client and head, another server
                        rec = self.split(i, ports[mode])
                    rec.update(mode=mode, image=i, rep=rep)
                    out.append(rec)
                    if mode != "local":
                        pending.append((rec, c))
        time.sleep(0.2)  # the last connection's closing packets
        end = self.counter.read()
        for (rec, c), nxt in zip(pending, [p[1] for p in pending[1:]] + [end], strict=True):
            rec["link_bytes"] = None if c is None or nxt is None else nxt - c
        return out


def device_side(spec: DeviceSpec) -> None:
    dev = Device(spec)
    _say({"ready": True})
    for cmd in _commands():
        if cmd["cmd"] == "run":
            _say({"results": dev.run(cmd)})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    role, spec_path = argv[0], Path(argv[1])
    text = spec_path.read_text()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    try:
        if role == "server":
            serve_side(ServerSpec.from_json(text))
        else:
            device_side(DeviceSpec.from_json(text))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the orchestrator cleans up
        return 130
    except Exception as e:  # the orchestrator reads this line and stops with it
        _say({"error": f"{role}: {type(e).__name__}: {e}"})
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
