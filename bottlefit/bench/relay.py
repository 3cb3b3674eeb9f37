"""A TCP relay on the server side of an emulated link: it counts every byte each request puts on the link (and
the binary tensor bytes inside it), times the server between the request's last byte and the response's first,
and, where the kernel has no netem, holds each chunk for the link's propagation delay (the request also for the
TCP handshake's round trip: in reality no data leaves before it).

One relay per (link, mode), each on its own port in front of one server; one connection is one request (the
clients send ``Connection: close``). The relay's clock is the server's, so ``server_ms`` needs no clock sync.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

CHUNK = 1 << 16
MSS, FRAME_HEADERS = 1448, 66  # TCP payload per frame on a 1500-byte MTU; Ethernet + IPv4 + TCP with timestamps
_HEADER_END = b"\r\n\r\n"


@dataclass
class Exchange:
    """One connection through the relay."""

    relay: str
    up_bytes: int = 0  # client -> server: the HTTP request as TCP payload
    down_bytes: int = 0  # server -> client
    http_body: int = -1  # Content-Length of the request
    json_header: int = -1  # Inference-Header-Content-Length (the KServe v2 binary extension's JSON part)
    server_ms: float = 0.0  # last request byte delivered -> first response byte received

    @property
    def binary_bytes(self) -> int:
        """The request's binary tensor section: body minus its JSON header."""
        return self.http_body - self.json_header if self.http_body >= 0 and self.json_header >= 0 else -1

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "binary_bytes": self.binary_bytes}


def _http_lengths(head: bytes) -> tuple[int, int]:
    body = jh = -1
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            body = int(v.strip() or -1)
        elif k == b"inference-header-content-length":
            jh = int(v.strip() or -1)
    return body, jh


class Relay:
    def __init__(self, name: str, target: tuple[str, int], one_way_s: float, handshake_s: float,
                 rate_bps: float = 0.0) -> None:
        self.name, self.target = name, target
        self.one_way_s, self.handshake_s, self.rate_bps = one_way_s, handshake_s, rate_bps
        self.records: list[Exchange] = []
        self.lock = threading.Lock()
        self.port = 0

    def first_frame_s(self, nbytes: int) -> float:
        """tbf sends the first frame of a burst at once (its bucket is full) and paces the rest: that frame's
        serialization time at the link's rate, which the relay adds (0 where netem shapes)."""
        return (min(nbytes, MSS) + FRAME_HEADERS) * 8 / self.rate_bps if self.rate_bps > 0 else 0.0

    async def start(self, host: str) -> None:
        self.server = await asyncio.start_server(self._handle, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ex: Exchange, up: bool,
                    marks: dict[str, float]) -> None:
        """Copy one direction, each chunk released ``one_way_s`` after it arrived (the request's chunks also
        ``handshake_s`` later, and both directions one first frame's serialization later), in order. Reading goes on
        while earlier chunks wait, so delays never add up."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            due_prev, head, first, shift = 0.0, b"", True, 0.0
            try:
                while True:
                    data = await reader.read(CHUNK)
                    now = loop.time()
                    if not data:
                        break
                    if up:
                        ex.up_bytes += len(data)
                        if ex.http_body < 0 and len(head) < 65536:
                            head += data
                            if _HEADER_END in head:
                                hdr = head.split(_HEADER_END, 1)[0]
                                ex.http_body, ex.json_header = _http_lengths(hdr)
                                marks["total"] = len(hdr) + len(_HEADER_END) + max(ex.http_body, 0)
                    else:
                        if first and "sent" in marks:
                            ex.server_ms = (time.perf_counter() - marks["sent"]) * 1e3
                        ex.down_bytes += len(data)
                    if first:
                        # the whole stream moves by the same amount: data cannot leave before the handshake's round
                        # trip, and every frame behind tbf's first one is early by that frame's serialization
                        shift = self.one_way_s + (self.handshake_s if up else 0.0) + self.first_frame_s(len(data))
                    due = max(now + shift, due_prev)
                    first, due_prev = False, due
                    q.put_nowait((due, data))
            except (ConnectionError, OSError):
                pass
            finally:
                q.put_nowait((0.0, b""))

        async def write() -> None:
            sent = 0
            try:
                while True:
                    due, data = await q.get()
                    if not data:
                        break
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())
                    writer.write(data)
                    await writer.drain()
                    sent += len(data)
                    if up and "total" in marks and sent >= marks["total"]:
                        marks["sent"] = time.perf_counter()
                if writer.can_write_eof():
                    writer.write_eof()
            except (ConnectionError, OSError, RuntimeError):
                pass

        await asyncio.gather(read(), write())

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        ex = Exchange(self.name)
        marks: dict[str, float] = {}
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.close()
            return
        try:
            await asyncio.gather(self._pump(creader, swriter, ex, True, marks),
                                 self._pump(sreader, cwriter, ex, False, marks))
        finally:
            for w in (swriter, cwriter):
                w.close()
            with self.lock:
                self.records.append(ex)

    def take(self) -> list[Exchange]:
        with self.lock:
            out, self.records = self.records, []
        return out


class Relays:
    """Relays on one event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bottlefit-relay", daemon=True)
        self.thread.start()
        self.relays: dict[str, Relay] = {}

    def add(self, name: str, host: str, target: tuple[str, int], one_way_s: float, handshake_s: float,
            rate_bps: float = 0.0) -> int:
        r = Relay(name, target, one_way_s, handshake_s, rate_bps)
        asyncio.run_coroutine_threadsafe(r.start(host), self.loop).result(timeout=10)
        self.relays[name] = r
        return r.port

    def take(self) -> dict[str, list[Exchange]]:
        # let connections that are closing record themselves
        time.sleep(0.05)
        return {n: r.take() for n, r in self.relays.items()}

    def close(self) -> None:
        async def _close() -> None:
            for r in self.relays.values():
                r.server.close()

        try:
            asyncio.run_coroutine_threadsafe(_close(), self.loop).result(timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
