"""``bottlefit serve`` and ``bottlefit run-head``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bottlefit.flags import add_renamed

TOKEN_ENV = "BOTTLEFIT_SERVE_TOKEN"  # the bearer token, when no --token-file (server and client alike)
COMMANDS = ("serve", "run-head", "triton")  # what register() adds (bottlefit.cli builds only these for them)
_SERVE_DEPS = ("starlette", "uvicorn", "grpc", "tritonclient", "zstandard", "constriction")


def _require_serve_extra() -> None:
    """The transport and codec libraries are an extra: say how to get them (exit 3), not a traceback."""
    import importlib.util

    from bottlefit.errors import EnvironmentProblem

    missing = [m for m in _SERVE_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise EnvironmentProblem(f"{', '.join(missing)} not installed: pip install 'bottlefit[serve]'")


def read_token(path: str | None, env: str) -> str | None:
    """A bearer token: the first line of ``path`` (``--token-file``), else the environment variable ``env``, else
    None. Never a flag's value: command lines are visible to every user of the machine (ps)."""
    import os

    from bottlefit.errors import UserError

    if path is not None:
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--token-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        if not token or any(c.isspace() for c in token):
            raise UserError(f"--token-file {path}: must hold one token (no spaces) on one line")
        return token
    return os.environ.get(env) or None


def _cmd_serve(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from bottlefit.serve.server import ServeOptions, Server

    opts = ServeOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, max_batch=args.max_batch,
                        max_delay_ms=args.max_delay_ms, workers=args.workers, queue_size=args.queue_size,
                        threads=args.threads, max_request_bytes=args.max_request_bytes, name=args.model_name,
                        grpc_max_concurrency=args.grpc_max_concurrency,
                        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
                        tls_key=Path(args.tls_key) if args.tls_key else None,
                        token=read_token(args.token_file, TOKEN_ENV), allow_failed=args.allow_failed)
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
    from bottlefit.serve.client import Client, check_images

    check_images(args.images)  # a missing image is refused before anything is sent (exit 2)
    client = Client(Path(args.dir), args.server, model=args.model_name, wire=args.wire, head=args.head,
                    reference=args.reference, retries=args.retries, timeout_s=args.timeout, topk=args.topk,
                    ca_file=args.ca_file, token=read_token(args.token_file, TOKEN_ENV))
    if not args.json:
        print(f"head {client.contract.target}/{client.contract.head} ({client.contract.runtime}), contract "
              f"{client.contract.contract_id}, wire {client.wire} -> {client.url}", file=sys.stderr)
    failed = 0
    causes: list[str] = []
    total = len(args.images)
    bar = progress_bar(total, sys.stderr)
    for i, r in enumerate(client.run(args.images), 1):
        failed += not r.ok
        if not r.ok:
            causes.append(r.cause)
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
        raise _failure(failed, total, causes, client.url)
    return 0


def _failure(failed: int, total: int, causes: list[str], url: str) -> Exception:
    """The run's error by whose problem it is (bottlefit.errors): a server that could not be reached or failed
    is the environment's (exit 3), and wins, since no image can get through it; else unreadable images or
    requests the server refused are the user's (exit 2)."""
    from bottlefit.errors import EnvironmentProblem, UserError
    from bottlefit.serve.client import CAUSE_INPUT, CAUSE_UNREACHABLE

    head = f"{failed} of {total} image(s) failed (listed above)"
    if CAUSE_UNREACHABLE in causes:
        return EnvironmentProblem(f"{head}: the server at {url} could not be reached or failed; start "
                                  "`bottlefit serve` there or pass --server")
    if CAUSE_INPUT in causes:
        return UserError(f"{head}: replace or remove the images that cannot be read")
    return UserError(f"{head}: the server refused the requests; serve this export's tail or pass --model-name")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common],
                       help="serve an export's tail over the Open Inference Protocol (KServe v2: REST and gRPC)")
    p.add_argument("out", help="the export root (holding onnx/ with tail.onnx; heads of other targets add contracts)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 with --tls-cert for devices)")
    p.add_argument("--http-port", type=int, default=8000, help="REST port (default 8000; 0: any free one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001; 0: any free one)")
    p.add_argument("--model-name", help="model name on the protocol (default <arch>_tail)")
    p.add_argument("--max-batch", type=int, default=16, help="samples per batch run")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="how long a batch waits for more requests")
    p.add_argument("--workers", type=int, default=2, help="tail runs in parallel")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting before the server answers 503")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per run")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20, help="larger requests get 413")
    p.add_argument("--grpc-max-concurrency", type=int, default=64,
                   help="gRPC calls in flight at once; more get RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve REST (https) and gRPC over TLS with this certificate "
                   "(chain); needs --tls-key")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--token-file", metavar="FILE",
                   help="require 'Authorization: Bearer <token>' (REST header, gRPC metadata) on every call but the "
                        "health ones; the token is FILE's first line (default: $BOTTLEFIT_SERVE_TOKEN if set)")
    p.add_argument("--allow-failed", action="store_true",
                   help="serve an export whose recorded parity verdict is not a pass (refused by default)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("run-head", parents=[common],
                       help="run the head on images, send coded bottlenecks to a tail server, print the logits")
    p.add_argument("dir", help="OUT/<target> (or OUT) holding the head artifact")
    p.add_argument("images", nargs="+")
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the tail server's URL (`bottlefit serve`, "
                   "Triton)")
    p.add_argument("--model-name", help="model name on the server (default <arch>_tail)")
    p.add_argument("--head", help="head artifact file (default: the head the board runs, as the bundle's board "
                   "scripts pick it: an rpi/ bundle's board profile default (ncnn int8); else the int8 head, TFLite "
                   "before ONNX)")
    p.add_argument("--wire", default="int8", help="how the bottleneck travels: fp32, int8, raw, zstd, entropy, "
                   "context (Triton's ensemble: the coded ones; fp32: --model-name <arch>_tail_fp32)")
    p.add_argument("--reference", action="store_true", help="run the head under its reference semantics")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request, with backoff")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one request's answer")
    p.add_argument("--topk", type=int, default=5,
                   help="classes to print per image, with their softmax probabilities")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.add_argument("--ca-file", metavar="PEM", help="trust this certificate (or CA) for an https --server")
    p.add_argument("--token-file", metavar="FILE",
                   help="send 'Authorization: Bearer <FILE's first line>' (default: $BOTTLEFIT_SERVE_TOKEN if set)")
    p.set_defaults(func=_cmd_run_head)

    p = sub.add_parser("triton", parents=[common],
                       help="write an NVIDIA Triton model repository: the split tail as an ensemble taking the wire "
                            "frames the device sends to `bottlefit serve`, and the FP32 tail")
    p.add_argument("dir", help="the --out root of `bottlefit export` (every target's int8 heads are served), or "
                               "OUT/onnx")
    add_renamed(p, "--out", "--repo", required=True, metavar="REPO",
                help="the model repository folder (created if missing)")
    p.add_argument("--model-name", help="the ensemble's name (default <arch>_tail, what the clients call)")
    p.add_argument("--max-batch-size", type=int, default=16, help="the FP32 tail's dynamic batching limit")
    p.add_argument("--tail-backend", choices=("onnxruntime", "python"), default="onnxruntime",
                   help="onnxruntime: platform onnxruntime_onnx (NVIDIA's containers); python: ONNX Runtime inside a "
                        "python-backend model (a Triton without the onnxruntime backend)")
    p.add_argument("--storage-uri", default=None,
                   help="where the KServe InferenceService written beside the models finds the repository "
                        "(default pvc://bottlefit-models/triton)")
    p.add_argument("--json", action="store_true", help="print the files written as one JSON object")
    p.set_defaults(func=_cmd_triton)


def _cmd_triton(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bottlefit.errors import UserError
    from bottlefit.serve.triton import RepositoryOptions, TailBackend, write_triton_repository

    if args.max_batch_size < 0:
        raise UserError(f"--max-batch-size {args.max_batch_size}: give 0 (no batching) or more")
    repo = Path(args.out)
    files = write_triton_repository(Path(args.dir), repo, name=args.model_name, options=RepositoryOptions(
        max_batch_size=args.max_batch_size, tail_backend=TailBackend(args.tail_backend),
        **({"storage_uri": args.storage_uri} if args.storage_uri else {})))
    if args.json:
        print(json.dumps({"repository": str(repo), "files": [str(f) for f in files]}))
        return 0
    for f in files:
        print(f"wrote {f}")
    return 0
