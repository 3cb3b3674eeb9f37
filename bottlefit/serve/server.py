"""``bottlefit serve``: REST (uvicorn + Starlette) and gRPC over one served tail, with graceful shutdown."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bottlefit.serve.model import ServedModel


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    max_batch: int = 16
    max_delay_ms: float = 2.0
    workers: int = 2
    queue_size: int = 64
    threads: int = 1
    max_request_bytes: int = 16 << 20
    name: str | None = None


class Server:
    """Both endpoints over one model. ``start()`` runs them in background threads (tests, embedding);
    ``serve_forever()`` runs REST in this thread with uvicorn's signal handling (SIGINT/SIGTERM: stop accepting,
    finish what is in flight, then stop gRPC with a grace period and drain the batch queue)."""

    def __init__(self, out: Path, options: ServeOptions | None = None) -> None:
        import uvicorn

        from bottlefit.serve.rest import build_app

        self.options = o = options or ServeOptions()
        self.model = ServedModel(Path(out), name=o.name, max_batch=o.max_batch, max_delay_ms=o.max_delay_ms,
                                 workers=o.workers, queue_size=o.queue_size, threads=o.threads)
        self.app = build_app(self.model, o.max_request_bytes)
        self.sock = socket.socket(socket.AF_INET6 if ":" in o.host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((o.host, o.http_port))
        self.http_port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                                limit_concurrency=256, lifespan="off")
        self.uvicorn = uvicorn.Server(config)
        self.grpc: Any = None
        self.grpc_port = 0
        self._thread: threading.Thread | None = None

    def _start_grpc(self) -> None:
        from bottlefit.serve.grpc import start_grpc

        self.grpc, self.grpc_port = start_grpc(self.model, self.options.host, self.options.grpc_port,
                                               self.options.max_request_bytes)

    @property
    def http_url(self) -> str:
        host = self.options.host
        return f"http://[{host}]:{self.http_port}" if ":" in host else f"http://{host}:{self.http_port}"

    def start(self, timeout_s: float = 20.0) -> Server:
        import time

        self._start_grpc()
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="bottlefit-rest", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("REST server did not start")
            time.sleep(0.02)
        return self

    def serve_forever(self, announce: Any = print) -> None:
        self._start_grpc()
        announce(f"bottlefit serve: model {self.model.name!r} (tail {self.model.tail_target.path.name}/"
                 f"{self.model.tail_artifact.file}; contracts "
                 f"{', '.join(f'{c.contract_id}={c.target}/{c.head}' for c in self.model.contracts.values())})")
        announce(f"  REST {self.http_url}/v2   gRPC {self.options.host}:{self.grpc_port}   (Ctrl-C stops)")
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.stop()

    def stop(self, grace_s: float = 5.0) -> None:
        self.model.batcher.closed = True  # new requests: 503 while in-flight ones finish
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=grace_s + 10)
        if self.grpc is not None:
            self.grpc.stop(grace_s).wait()
        self.model.batcher.closed = False
        self.model.close()
        self.sock.close()
