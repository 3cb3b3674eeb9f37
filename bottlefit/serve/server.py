"""``bottlefit serve``: REST (uvicorn + Starlette) and gRPC over one served tail, with graceful shutdown.

Imports no torch: the tail runs in ONNX Runtime; the server needs numpy, the codecs and the transports only.
"""

from __future__ import annotations

import errno
import signal
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bottlefit.errors import EnvironmentProblem, UserError
from bottlefit.serve.model import ServedModel


@dataclass
class ServeOptions:
    """What ``bottlefit serve``'s flags say, checked once (UserError naming the flag)."""

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
    grpc_max_concurrency: int = 64
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None
    allow_failed: bool = False
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        for flag, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port)):
            if not 0 <= port <= 65535:
                raise UserError(f"{flag} {port}: a TCP port is 0..65535 (0: any free one)")
        if self.http_port and self.http_port == self.grpc_port:
            raise UserError(f"--http-port and --grpc-port are both {self.http_port}: give them different ports")
        for flag, value in (("--max-batch", self.max_batch), ("--workers", self.workers),
                            ("--queue-size", self.queue_size), ("--threads", self.threads),
                            ("--max-request-bytes", self.max_request_bytes),
                            ("--grpc-max-concurrency", self.grpc_max_concurrency)):
            if value < 1:
                raise UserError(f"{flag} {value}: must be at least 1")
        if self.max_delay_ms < 0:
            raise UserError(f"--max-delay-ms {self.max_delay_ms}: must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("--tls-cert and --tls-key go together: pass the certificate (chain) and its private key")
        if self.token is not None and not self.token.strip():
            raise UserError("the bearer token is empty or blank: give a token of printable characters")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def _check_tls(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM), loaded once into an SSL context to check they are a pair."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError, ValueError) as e:
        raise UserError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private key ({e})") \
            from None
    return Path(key).read_bytes(), Path(cert).read_bytes()


def _bind_rest(host: str, port: int) -> socket.socket:
    """The REST listening socket, or a one-line UserError naming the flag (a busy port is the user's to fix)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: not an address of this host ({e})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart over TIME_WAIT; Linux still refuses a
    try:                                                         # port another socket listens on
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--http-port {port}: {host}:{port} is in use by another process; pick another "
                            "--http-port or stop the other server") from None
        if e.errno == errno.EACCES:
            raise UserError(f"--http-port {port}: binding {host}:{port} needs privileges here; use a port >= 1024"
                            ) from None
        raise UserError(f"--host {host} --http-port {port}: cannot bind ({e.strerror})") from None
    return sock


class Server:
    """Both endpoints over one model. ``start()`` runs them in background threads (tests, embedding);
    ``serve_forever()`` runs them until SIGINT or SIGTERM, then stops gracefully (:meth:`stop`).

    Both ports are bound before anything starts, and a failure releases what was taken (the temporary
    directory too)."""

    def __init__(self, out: Path, options: ServeOptions | None = None) -> None:
        import uvicorn

        from bottlefit.serve.grpc import build_grpc
        from bottlefit.serve.rest import build_app

        self.options = o = options or ServeOptions()
        tls = _check_tls(o.tls_cert, o.tls_key) if o.tls_cert is not None and o.tls_key is not None else None
        self.model = ServedModel(Path(out), name=o.name, max_batch=o.max_batch, max_delay_ms=o.max_delay_ms,
                                 workers=o.workers, queue_size=o.queue_size, threads=o.threads,
                                 allow_failed=o.allow_failed)
        self.sock: socket.socket | None = None
        self.grpc: Any = None
        try:
            self.app = build_app(self.model, o.max_request_bytes, token=o.token)
            self.sock = _bind_rest(o.host, o.http_port)
            self.http_port = self.sock.getsockname()[1]
            self.grpc, self.grpc_port = build_grpc(self.model, o.host, o.grpc_port,
                                                   max_message_bytes=o.max_request_bytes,
                                                   max_concurrency=o.grpc_max_concurrency, tls=tls, token=o.token)
            ssl_files = {"ssl_certfile": str(o.tls_cert), "ssl_keyfile": str(o.tls_key)} if tls else {}
            config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=int(o.grace_s) + 5, limit_concurrency=256,
                                    lifespan="off", **ssl_files)
            self.uvicorn = uvicorn.Server(config)
        except BaseException:
            self._release()
            raise
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._stopped = False

    @property
    def http_url(self) -> str:
        host, scheme = self.options.host, "https" if self.options.tls else "http"
        return f"{scheme}://[{host}]:{self.http_port}" if ":" in host else f"{scheme}://{host}:{self.http_port}"

    def start(self, timeout_s: float = 20.0) -> Server:
        """Both endpoints in background threads; returns once REST accepts connections. uvicorn off the main
        thread installs no signal handlers: :meth:`serve_forever` owns them."""
        import time

        self.grpc.start()
        self._thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="bottlefit-rest", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError("the REST endpoint did not start (run with --verbose for uvicorn's log)")
            time.sleep(0.02)
        return self

    def serve_forever(self, announce: Any = print) -> str:
        """Serve until SIGINT/SIGTERM; then stop gracefully. Returns the signal's name."""
        received: list[int] = []

        def on_signal(sig: int, frame: Any) -> None:
            if received:  # a second signal: stop waiting for in-flight HTTP requests
                self.uvicorn.force_exit = True
            received.append(sig)
            self._stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            for line in self.model.warnings:
                announce(line)
            announce(f"bottlefit serve: model {self.model.name!r} (tail {self.model.tail_target.path.name}/"
                     f"{self.model.tail_artifact.file}; contracts "
                     f"{', '.join(f'{c.contract_id}={c.target}/{c.head}' for c in self.model.contracts.values())})")
            tls = "TLS" if self.options.tls else "no TLS"
            auth = "bearer token" if self.options.token else "no token"
            announce(f"  REST {self.http_url}/v2   gRPC {self.options.host}:{self.grpc_port}   ({tls}, {auth}; "
                     "Ctrl-C or SIGTERM stops)")
            if not self.options.tls and not _loopback(self.options.host):
                announce(f"WARNING: serving on {self.options.host} without TLS: anyone on the network reads the "
                         "bottlenecks" + (" and the token" if self.options.token else "")
                         + "; pass --tls-cert and --tls-key")
            while not self._stop.wait(0.5):
                if self._thread is None or not self._thread.is_alive():
                    break
        finally:
            self.stop()
            for s, h in previous.items():
                signal.signal(s, h)
        if not received:  # the REST endpoint ended on its own: not a clean stop
            raise EnvironmentProblem("the REST endpoint stopped unexpectedly (run with --verbose for uvicorn's log)")
        name = signal.Signals(received[0]).name
        announce(f"bottlefit serve: {name}: in-flight requests drained, stopped")
        return name

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new requests, let those in flight finish (gRPC: up to ``grace_s``), run what is queued, then
        release the ports, the ONNX Runtime session and the temporary directory. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.options.grace_s if grace_s is None else grace_s
        self.model.draining = True  # readiness answers false from now on
        done = self.grpc.stop(grace)  # new RPCs refused; in-flight ones get up to `grace`
        self.uvicorn.should_exit = True  # new connections refused; in-flight requests finish
        self.model.batcher.close()  # run what is queued now (no waiting for a batch to fill)
        if self._thread is not None:
            self._thread.join(timeout=grace + 10)
        done.wait(grace + 1)
        self._release()

    def _release(self) -> None:
        if self.grpc is not None:
            self.grpc.stop(None)
        if self.sock is not None:
            self.sock.close()
        self.model.close()


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
