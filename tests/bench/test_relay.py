"""The bench's link relay on loopback: what it counts (bytes each way, the KServe binary extension's parts), the
server time it measures, the delays it adds, and that it passes the bytes through unchanged."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from bottlefit.bench.relay import MSS, Exchange, Relay, Relays, _http_lengths

SERVER_SLEEP_S = 0.15


class Backend:
    """A one-request-per-connection server: reads the HTTP head and its Content-Length body, sleeps, answers the
    body's sha256 (32 bytes) after a fixed head."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                length, _ = _http_lengths(head)
                while len(body) < length:
                    body += conn.recv(65536)
                time.sleep(SERVER_SLEEP_S)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 32\r\n\r\n" + hashlib.sha256(body).digest())

    def close(self) -> None:
        self.sock.close()


RESPONSE_BYTES = len(b"HTTP/1.1 200 OK\r\nContent-Length: 32\r\n\r\n") + 32


def request(json_part: bytes, binary: bytes) -> bytes:
    body = json_part + binary
    return (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Length: %d\r\nInference-Header-Content-Length: %d\r\n\r\n" % (len(body), len(json_part))) + body


def exchange(port: int, data: bytes) -> tuple[bytes, float]:
    """Send ``data`` through the relay, read the whole answer: (answer, seconds from connect to the last byte)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got, time.perf_counter() - t0


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.close()


@pytest.fixture
def relays() -> Iterator[Relays]:
    r = Relays()
    yield r
    r.close()


def test_http_lengths_reads_both_headers_case_blind() -> None:
    assert _http_lengths(b"POST / HTTP/1.1\r\ncontent-length: 120\r\nINFERENCE-HEADER-CONTENT-LENGTH: 20") == (120, 20)
    assert _http_lengths(b"POST / HTTP/1.1\r\nHost: x") == (-1, -1)
    # the request line is never read as a header, even when it looks like one
    assert _http_lengths(b"Content-Length: 5\r\nHost: x") == (-1, -1)


def test_binary_bytes_is_the_body_minus_its_json_header() -> None:
    assert Exchange("r", http_body=1000, json_header=180).binary_bytes == 820
    assert Exchange("r", http_body=1000).binary_bytes == -1  # no binary extension: unknown, not 1001
    assert Exchange("r", http_body=1000, json_header=180).to_dict()["binary_bytes"] == 820


@pytest.mark.parametrize(("nbytes", "rate", "want_s"), [
    (100, 1e6, 1.328e-3),  # a short chunk is its own frame: 100 B + 66 B of headers at 1 Mbit/s
    (10 * MSS, 1e6, 12.112e-3),  # a long one: only its first full 1514-B frame goes unpaced
    (10 * MSS, 0.0, 0.0),  # netem shapes the link: the relay adds nothing
])
def test_first_frame_time(nbytes: int, rate: float, want_s: float) -> None:
    assert Relay("r", ("127.0.0.1", 1), 0.0, 0.0, rate).first_frame_s(nbytes) == pytest.approx(want_s)


def test_counts_bytes_and_server_time_and_passes_data_unchanged(backend: Backend, relays: Relays) -> None:
    json_part, binary = b'{"inputs": []}', bytes(range(256)) * 1000  # 256 kB: several relay chunks
    port = relays.add("lte/split", "127.0.0.1", ("127.0.0.1", backend.port), 0.0, 0.0)
    req = request(json_part, binary)
    got, _ = exchange(port, req)
    assert got.endswith(hashlib.sha256(json_part + binary).digest())  # every byte arrived, in order
    records = relays.take()
    assert list(records) == ["lte/split"] and len(records["lte/split"]) == 1
    rec = records["lte/split"][0].to_dict()  # as the server peer sends it
    assert rec["up_bytes"] == len(req) and rec["down_bytes"] == len(got) == RESPONSE_BYTES
    assert rec["http_body"] == len(json_part) + len(binary) and rec["json_header"] == len(json_part)
    assert rec["binary_bytes"] == len(binary)
    # the relay's clock runs from the request's last byte to the answer's first: the backend's sleep is inside it
    assert SERVER_SLEEP_S * 1e3 <= rec["server_ms"]
    assert relays.take() == {"lte/split": []}  # taken records are gone


def test_one_record_per_connection_per_relay(backend: Backend, relays: Relays) -> None:
    a = relays.add("3g/offload", "127.0.0.1", ("127.0.0.1", backend.port), 0.0, 0.0)
    b = relays.add("3g/split", "127.0.0.1", ("127.0.0.1", backend.port), 0.0, 0.0)
    assert a != b
    for port, n in ((a, 2), (b, 1)):
        for _ in range(n):
            exchange(port, request(b"{}", b"x" * 10))
    records = relays.take()
    assert {k: len(v) for k, v in records.items()} == {"3g/offload": 2, "3g/split": 1}
    assert all(r.binary_bytes == 10 and r.relay == k for k, rs in records.items() for r in rs)


def test_delays_hold_each_direction(backend: Backend, relays: Relays) -> None:
    """One way 100 ms, handshake 200 ms: the request leaves after 300 ms, the answer after 100 ms more, so the
    exchange takes at least 400 ms plus the backend's sleep (lower bounds only: the delays are sleeps)."""
    one_way, handshake = 0.1, 0.2
    port = relays.add("slow", "127.0.0.1", ("127.0.0.1", backend.port), one_way, handshake)
    _, took = exchange(port, request(b"{}", b"y" * 100))
    assert took >= 2 * one_way + handshake + SERVER_SLEEP_S
    rec = relays.take()["slow"][0]
    assert SERVER_SLEEP_S * 1e3 <= rec.server_ms
    assert rec.up_bytes == len(request(b"{}", b"y" * 100))


def test_unreachable_backend_closes_the_client_and_records_nothing(relays: Relays) -> None:
    s = socket.create_server(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()  # nothing listens there now
    port = relays.add("dead", "127.0.0.1", ("127.0.0.1", dead), 0.0, 0.0)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        try:
            c.sendall(request(b"{}", b""))
            got = c.recv(65536)
        except ConnectionError:  # closed before or while the request went out
            got = b""
    assert got == b""
    assert relays.take() == {"dead": []}
