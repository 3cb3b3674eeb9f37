"""Split serving through NVIDIA Triton (the ensemble `bottlefit triton` writes) vs `bottlefit serve`, side by side.

1. Payload bytes per request (measured on the built-in held-out photos' codes under the head's reference
   semantics): what a device sends to the old FP32 Triton repository (the dequantized bottleneck, 4 B per code) vs
   what it sends to the ensemble (one wire frame per codec, header included: the same bytes as to `bottlefit
   serve`).
2. Throughput and latency (measured, this host): ``--clients`` concurrent clients (threads, each its own HTTP
   connection per request as the board client does) send ``--requests`` context frames in all, first to
   `bottlefit serve` then to a real ``tritonserver`` (nvidia-pytriton's 2.51, python backend: the decode step and
   the ONNX tail's python twin) loading the repository written from the same export, alternating ``--rounds``
   times; requests/s and p50/p99 of the round trip, and the batch sizes Triton's dynamic batcher formed (from its
   statistics endpoint).

    PYTHONPATH=. .venv/bin/python bench/bench_triton.py [OUT ...] [--clients 16 --requests 256 --rounds 2]
    # default: the demo's trained export (out/demo) and an untrained R152 v2 (12 ch) export for bytes; the first
    # export for the load test
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bottlefit.serve import codecs
from bottlefit.serve.client import build_request, pick_head
from bottlefit.serve.contract import tail_model_name
from bottlefit.serve.head import calibration_symbols, load_tables


def _r152(root: Path) -> Path:
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions

    out = root / "r152"
    export(ExportRequest(ModelSource(untrained=True, arch="custom_resnet152", bottleneck_channel=12,
                                     bottleneck_ver="2"), "onnx", out, OnnxOptions(int8=True, triton=False),
                         parity=ParityOptions(emulate=Emulate.parse("none"))), log=lambda m: None)
    return out


def payload_bytes(out: Path) -> dict[str, float]:
    """Mean bytes per request body's tensor data: fp32 (the old repository) and each codec's frame."""
    target, contract = pick_head(out)
    tables = load_tables(target, contract)
    sym = calibration_symbols(target, contract, "heldout")
    codes = [codecs.from_symbols(contract, s) for s in sym]
    res = {"fp32": float(4 * np.prod(contract.shape))}
    for codec in codecs.CODECS:
        res[codec] = float(np.mean([len(codecs.encode_frame(contract, c, codec, tables)) for c in codes]))
    print(f"\n{target.card.arch} {target.path.name}/{contract.head} {contract.dtype}{list(contract.shape)}, "
          f"{len(codes)} held-out images: bytes per request (tensor data)")
    for k, v in res.items():
        print(f"  {k:8s} {v:9.1f} B  ({res['fp32'] / v:5.2f}x less than fp32)")
    return res


def _bodies(out: Path, n: int) -> tuple[str, list[tuple[bytes, int]]]:
    target, contract = pick_head(out)
    tables = load_tables(target, contract)
    codes = [codecs.from_symbols(contract, s) for s in calibration_symbols(target, contract, "heldout")]
    bodies = [build_request(contract, codes[i % len(codes)], "context", "bottleneck", tables)[:2] for i in range(n)]
    return tail_model_name(target.card), bodies


def load(url: str, bodies: list[tuple[bytes, int]], clients: int) -> dict[str, float]:
    """All ``bodies`` posted by ``clients`` threads; requests/s and round-trip percentiles (ms)."""
    lat: list[float] = []
    lock = threading.Lock()
    fails = 0

    def one(i: int) -> None:
        nonlocal fails
        body, hl = bodies[i]
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Inference-Header-Content-Length": str(hl), "Content-Type": "application/octet-stream"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()
        except OSError:
            with lock:
                fails += 1
            return
        with lock:
            lat.append((time.perf_counter() - t0) * 1e3)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(bodies))))
    wall = time.perf_counter() - t0
    q = np.percentile(lat, [50, 99]) if lat else [float("nan")] * 2
    return {"rps": len(lat) / wall, "p50_ms": float(q[0]), "p99_ms": float(q[1]), "failed": fails}


def triton_batches(http_url: str, model: str) -> dict[int, int]:
    with urllib.request.urlopen(f"{http_url}/v2/models/{model}/stats", timeout=10) as r:
        s = json.loads(r.read())["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in s.get("batch_stats", [])}


def serving(out: Path, clients: int, requests: int, rounds: int, workdir: Path) -> None:
    from bottlefit.serve.server import ServeOptions, Server
    from bottlefit.serve.triton import FP32_SUFFIX, RepositoryOptions, TailBackend, write_triton_repository
    from bottlefit.serve.triton_server import TritonServer, ensure_server

    model, bodies = _bodies(out, requests)
    write_triton_repository(out, workdir / "repo", options=RepositoryOptions(tail_backend=TailBackend.PYTHON))
    triton = TritonServer(ensure_server(print), workdir / "repo", workdir / "tritonserver.log").start()
    serve = Server(out, ServeOptions(http_port=0, grpc_port=0)).start()
    results: dict[str, list[dict[str, float]]] = {"bottlefit serve": [], "triton": []}
    try:
        for url in (serve.http_url, triton.http_url):  # warm-up: sessions, first-call costs
            load(f"{url}/v2/models/{model}/infer", bodies[:clients], clients)
        before = triton_batches(triton.http_url, model + FP32_SUFFIX)
        for _ in range(rounds):
            for name, url in (("bottlefit serve", serve.http_url), ("triton", triton.http_url)):
                results[name].append(load(f"{url}/v2/models/{model}/infer", bodies, clients))
        after = triton_batches(triton.http_url, model + FP32_SUFFIX)
    finally:
        serve.stop()
        triton.stop()
    print(f"\n{model}: {requests} context-coded requests x {rounds} rounds from {clients} concurrent clients "
          "(measured, this host; the two servers alternate)")
    for name, rs in results.items():
        print(f"  {name:16s} {statistics.median(r['rps'] for r in rs):8.1f} req/s  "
              f"p50 {statistics.median(r['p50_ms'] for r in rs):7.2f} ms  "
              f"p99 {statistics.median(r['p99_ms'] for r in rs):7.2f} ms  failed {sum(r['failed'] for r in rs)}")
    formed = {b: after.get(b, 0) - before.get(b, 0) for b in sorted(after) if after.get(b, 0) != before.get(b, 0)}
    print(f"  Triton's dynamic batcher formed (batch size: executions): {formed}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outs", nargs="*", type=Path)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as d:
        outs = a.outs
        if not outs:
            from bottlefit.bench.split import demo_model

            outs = [demo_model(Path("out/demo"), print), _r152(Path(d))]
        for out in outs:
            payload_bytes(out)
        serving(outs[0], a.clients, a.requests, a.rounds, Path(d))


if __name__ == "__main__":
    main()
