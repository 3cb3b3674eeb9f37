"""``bottlefit serve`` and ``bottlefit run-head``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_SERVE_DEPS = ("starlette", "uvicorn", "grpc", "tritonclient", "zstandard", "constriction")


def _require_serve_extra() -> None:
    """The transport and codec libraries are an extra: say how to get them (exit 3), not a traceback."""
    import importlib.util

    from bottlefit.errors import EnvironmentProblem

    missing = [m for m in _SERVE_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise EnvironmentProblem(f"{', '.join(missing)} not installed: pip install 'bottlefit[serve]'")


def _cmd_serve(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from bottlefit.serve.server import ServeOptions, Server

    opts = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, max_batch=args.max_batch,
                        max_delay_ms=args.max_delay_ms, workers=args.workers, queue_size=args.queue_size,
                        threads=args.threads, max_request_bytes=args.max_request_bytes, name=args.model_name)
    Server(Path(args.out), opts).serve_forever(lambda m: print(m, flush=True))
    return 0


def progress_bar(total: int, stream: Any) -> Any:
    """A tqdm bar on ``stream`` when it is a terminal (never in a pipe or a log: the lines stay clean)."""
    if not (hasattr(stream, "isatty") and stream.isatty()):
        return None
    from tqdm import tqdm

    # every image redraws (mininterval 0): images take milliseconds to seconds, and the last one shows too
    return tqdm(total=total, file=stream, unit="image", leave=False, dynamic_ncols=True, mininterval=0)


def _cmd_run_head(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from bottlefit.serve.client import Client

    client = Client(Path(args.dir), args.server, model=args.model_name, wire=args.wire, head=args.head,
                    reference=args.reference, retries=args.retries, timeout_s=args.timeout, topk=args.topk)
    if not args.json:
        print(f"head {client.contract.target}/{client.contract.head} ({client.contract.runtime}), contract "
              f"{client.contract.contract_id}, wire {client.wire} -> {client.url}", file=sys.stderr)
    failed = 0
    total = len(args.images)
    bar = progress_bar(total, sys.stderr)
    for i, r in enumerate(client.run(args.images), 1):
        failed += not r.ok
        line = json.dumps(r.to_dict()) if args.json else f"[{i}/{total}] {r.line()}"
        if bar is not None:
            bar.write(line, file=sys.stdout)  # above the bar, which redraws below it
            sys.stdout.flush()
            bar.set_postfix_str(f"{failed} failed" if failed else "", refresh=False)
            bar.update(1)
        else:
            print(line, flush=True)
    if bar is not None:
        bar.close()
    if failed:
        print(f"bottlefit run-head: {failed} of {total} image(s) failed (listed above)", file=sys.stderr)
    return 1 if failed else 0


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common],
                       help="serve an export's tail over the Open Inference Protocol (KServe v2: REST and gRPC)")
    p.add_argument("out", help="the export root (holding onnx/ with tail.onnx; heads of other targets add contracts)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--model-name", help="model name on the protocol (default <arch>_tail)")
    p.add_argument("--max-batch", type=int, default=16, help="samples per batch run")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    p.add_argument("--workers", type=int, default=2, help="tail runs in parallel")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting before the server answers 503")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per run")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20, help="larger requests get 413")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("run-head", parents=[common],
                       help="run the head on images, send coded bottlenecks to a tail server, print the logits")
    p.add_argument("dir", help="OUT/<target> (or OUT) holding the head artifact")
    p.add_argument("images", nargs="+")
    p.add_argument("--server", default="http://127.0.0.1:8000")
    p.add_argument("--model-name", help="model name on the server (default <arch>_tail)")
    p.add_argument("--head", help="head artifact file (default: the int8 head)")
    p.add_argument("--wire", default="int8", help="fp32, int8, raw, zstd, entropy, context (Triton's ensemble: the "
                   "coded ones; fp32: --model-name <arch>_tail_fp32)")
    p.add_argument("--reference", action="store_true", help="run the head under its reference semantics")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.set_defaults(func=_cmd_run_head)

    p = sub.add_parser("triton", parents=[common],
                       help="write an NVIDIA Triton model repository: the split tail as an ensemble taking the wire "
                            "frames the device sends to `bottlefit serve`, and the FP32 tail")
    p.add_argument("dir", help="the --out root of `bottlefit export` (every target's int8 heads are served), or "
                               "OUT/onnx")
    p.add_argument("--repo", required=True, help="the model repository folder (created if missing)")
    p.add_argument("--model-name", help="the ensemble's name (default <arch>_tail, what the clients call)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--tail-backend", choices=("onnxruntime", "python"), default="onnxruntime",
                   help="onnxruntime: platform onnxruntime_onnx (NVIDIA's containers); python: ONNX Runtime inside a "
                        "python-backend model (a Triton without the onnxruntime backend)")
    p.add_argument("--storage-uri", default=None,
                   help="where the KServe InferenceService written beside the models finds the repository "
                        "(default pvc://bottlefit-models/triton)")
    p.set_defaults(func=_cmd_triton)


def _cmd_triton(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bottlefit.errors import UserError
    from bottlefit.serve.triton import RepositoryOptions, TailBackend, write_triton_repository

    if args.max_batch_size < 0:
        raise UserError(f"--max-batch-size {args.max_batch_size}: give 0 (no batching) or more")
    repo = Path(args.repo)
    files = write_triton_repository(Path(args.dir), repo, name=args.model_name, options=RepositoryOptions(
        max_batch_size=args.max_batch_size, tail_backend=TailBackend(args.tail_backend),
        **({"storage_uri": args.storage_uri} if args.storage_uri else {})))
    for f in files:
        print(f"wrote {f}")
    return 0
