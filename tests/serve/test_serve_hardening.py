"""`bottlefit serve` as a new user and an attacker try it (issue 20, section 2): ports, signals, malformed requests,
what it agrees to serve, gRPC concurrency, TLS and tokens, and a server that loads no torch."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

import bottlefit
from bottlefit.errors import UserError
from bottlefit.serve.client import build_request, logits_of
from bottlefit.serve.head import load_tables

H = "Inference-Header-Content-Length"
ROOT = Path(bottlefit.__file__).resolve().parents[1]  # the code under test: subprocesses import the same


def _post(url: str, body: bytes, header_len: int | None = None, headers: dict[str, str] | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, dict[str, Any], bytes]:
    h = dict(headers or {})
    if header_len is not None:
        h[H] = str(header_len)
    req = urllib.request.Request(url, data=body, method="POST", headers=h)
    try:
        with urllib.request.urlopen(req, timeout=20, context=context) as r:
            data, n = r.read(), r.headers.get(H)
            hl = int(n) if n else len(data)
            return r.status, json.loads(data[:hl]), data[hl:]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), b""


def _infer_url(server: Any) -> str:
    return f"{server.http_url}/v2/models/{server.model.name}/infer"


def _want(server: Any, contract: Any, codes: np.ndarray) -> np.ndarray:
    from bottlefit.runtimes.head import run_tail

    t = server.model.tail_target
    return run_tail(t.tail(), t.path, contract.dequantize(codes))


def _good_request(server: Any, heldout_codes: Any) -> None:
    _, contract, codes = heldout_codes
    body, hl, _ = build_request(contract, codes[0], "int8", "bottleneck", None)
    status, resp, binary = _post(_infer_url(server), body, hl)
    assert status == 200, resp
    assert np.array_equal(logits_of(resp, binary), _want(server, contract, codes[:1]))


def _env(tmp: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return env


class ServeProcess:
    """``python -m bottlefit serve`` in a subprocess, on free ports, its announce lines read."""

    def __init__(self, out: Path, *flags: str, tmp: Path | None = None, env: dict[str, str] | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "bottlefit", "serve", str(out), "--http-port", "0",
                                      "--grpc-port", "0", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**_env(tmp), **(env or {})}, cwd=ROOT)
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"REST (\S+)/v2\s+gRPC \S+:(\d+)", line)
            if m:
                self.http_url, self.grpc_port = m.group(1), int(m.group(2))
                for _ in range(200):
                    try:
                        with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=5, context=context):
                            return
                    except OSError:
                        time.sleep(0.05)
        raise AssertionError(f"serve did not start: {self.lines} {self.proc.stderr.read() if self.proc.stderr else ''}")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.http_url}/v2/models/stats", timeout=10) as r:
            return json.loads(r.read())["model_stats"][0]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture()
def serve_process(mini_export: Path) -> Iterator[Any]:
    started: list[ServeProcess] = []

    def start(*flags: str, tmp: Path | None = None, **kw: Any) -> ServeProcess:
        started.append(ServeProcess(mini_export, *flags, tmp=tmp, **kw))
        return started[-1]

    yield start
    for p in started:
        p.close()


def _run_cli(args: list[str], tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bottlefit", *args], capture_output=True, text=True, env=_env(tmp),
                          cwd=ROOT, timeout=timeout)


# -- 1. a gRPC port held by another server is refused, never shared (grpcio's SO_REUSEPORT default)


def test_second_server_on_a_busy_grpc_port_exits_2_and_the_first_keeps_it(served, mini_export, heldout_codes,
                                                                         tmp_path) -> None:
    _, contract, codes = heldout_codes
    port = served.grpc_port
    try:
        r = _run_cli(["serve", str(mini_export), "--http-port", "0", "--grpc-port", str(port),
                      "--model-name", "other_tail"], tmp_path, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a second server started on gRPC port {port}, already held by the first")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f"--grpc-port {port}" in err[0] and "in use" in err[0], r.stderr
    assert not list(tmp_path.glob("bottlefit-serve-*"))  # nothing left behind by the refused one
    for _ in range(20):  # every new channel reaches the first server's model
        g = tgrpc.InferenceServerClient(f"127.0.0.1:{port}")
        assert g.is_model_ready(served.model.name)
        q = tgrpc.InferInput("bottleneck", [1, 4, 5, 5], "UINT8")
        q.set_data_from_numpy(codes[:1])
        y = g.infer(served.model.name, [q], parameters={"contract_id": contract.contract_id}).as_numpy("logits")
        assert np.array_equal(y, _want(served, contract, codes[:1]))
        g.close()


def test_two_servers_on_one_loopback_grpc_port_in_process(served, mini_export) -> None:
    from bottlefit.serve.server import ServeOptions, Server

    with pytest.raises(UserError, match=rf"--grpc-port {served.grpc_port}: .*in use"):
        Server(mini_export, ServeOptions(http_port=0, grpc_port=served.grpc_port))


@pytest.mark.parametrize("flags, flag", [
    (["--http-port", "BUSY"], "--http-port"),
    (["--http-port", "70000"], "--http-port 70000"),
    (["--grpc-port", "-1"], "--grpc-port -1"),
])
def test_busy_or_out_of_range_ports_are_the_users_problem(served, mini_export, tmp_path, flags, flag) -> None:
    flags = [str(served.http_port) if f == "BUSY" else f for f in flags]
    base = {"--http-port": "0", "--grpc-port": "0"}
    base.update(dict(zip(flags[::2], flags[1::2], strict=True)))
    try:
        r = _run_cli(["serve", str(mini_export), *[x for kv in base.items() for x in kv]], tmp_path, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve started with {flags}")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "internal error" not in err[0], r.stderr


# -- 2. SIGTERM: in-flight gRPC calls drained, the temporary directory removed, exit 0


def test_sigterm_drains_in_flight_grpc_and_removes_the_temp_dir(serve_process, heldout_codes, served,
                                                                tmp_path) -> None:
    _, contract, codes = heldout_codes
    # a batch waits up to 30 s for more requests: the call below is still in flight when SIGTERM arrives
    srv = serve_process("--max-delay-ms", "30000", "--max-batch", "64", tmp=tmp_path)
    assert len(list(tmp_path.glob("bottlefit-serve-*/tail.batch.onnx"))) == 1
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    results: list[Any] = []
    q = tgrpc.InferInput("bottleneck", [1, 4, 5, 5], "UINT8")
    q.set_data_from_numpy(codes[:1])
    g.async_infer(served.model.name, [q], lambda result, error: results.append((result, error)),
                  parameters={"contract_id": contract.contract_id})
    for _ in range(200):  # until the server has decoded it and queued it for the tail
        if srv.stats()["inference_stats"]["compute_input"]["count"] >= 1:
            break
        time.sleep(0.05)
    assert not results
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0
    for _ in range(100):
        if results:
            break
        time.sleep(0.05)
    result, error = results[0]
    assert error is None, error
    assert np.array_equal(result.as_numpy("logits"), _want(served, contract, codes[:1]))
    assert not list(tmp_path.glob("bottlefit-serve-*"))
    assert "SIGTERM" in srv.proc.stdout.read()


# -- 3./4. malformed requests: the protocol's 400 (gRPC INVALID_ARGUMENT), never 500 or NaN logits


def _fp32_json(**extra: Any) -> bytes:
    return json.dumps({"inputs": [{"name": "bottleneck", "datatype": "FP32", "shape": [1, 4, 5, 5],
                                   "data": [0.0] * 100}], **extra}).encode()


def _uint8(params: str, data: str = "[" + ",".join(["255"] * 100) + "]", outputs: str = "") -> bytes:
    return ('{"inputs":[{"name":"bottleneck","datatype":"UINT8","shape":[1,4,5,5],"parameters":' + params
            + ',"data":' + data + "}]" + outputs + "}").encode()


MALFORMED = {
    "request parameters a list": lambda c: _fp32_json(parameters=[1]),
    "output parameters a string": lambda c: _fp32_json(outputs=[{"name": "logits", "parameters": "x"}]),
    "100000 nested brackets": lambda c: b"[" * 100_000,
    "contract scale not a number": lambda c: _uint8(f'{{"contract_id":"{c.contract_id}","scale":"abc"}}'),
    "zero point 1e999": lambda c: _uint8('{"scale":0.1,"zero_point":1e999}'),
    "scale 1e38, JSON response": lambda c: _uint8('{"scale":1e38,"zero_point":0}'),
    "scale 1e38, binary response": lambda c: _uint8(
        '{"scale":1e38,"zero_point":0}', outputs=',"outputs":[{"name":"logits","parameters":{"binary_data":true}}]'),
    "int8 scale 1e38": lambda c: _uint8('{"scale":1e38,"zero_point":0}', "[" + ",".join(["-128"] * 100) + "]"
                                        ).replace(b'"UINT8"', b'"INT8"'),
    "zero point outside uint8": lambda c: _uint8('{"scale":0.1,"zero_point":300}'),
    "scale a boolean": lambda c: _uint8('{"scale":true,"zero_point":0}'),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_rest_request_answers_400_with_error_json(served, heldout_codes, case: str) -> None:
    _, contract, _ = heldout_codes
    status, resp, binary = _post(_infer_url(served), MALFORMED[case](contract))
    assert status == 400, (status, resp)
    assert set(resp) == {"error"} and isinstance(resp["error"], str) and resp["error"], resp
    _good_request(served, heldout_codes)  # and the server keeps answering


@pytest.mark.parametrize("params, dtype, fill", [
    ({"contract_id": "CID", "scale": "abc"}, "UINT8", 255),
    ({"scale": 0.1, "zero_point": float("inf")}, "UINT8", 255),
    ({"scale": 1e38, "zero_point": 0}, "UINT8", 255),
    ({"scale": 1e38, "zero_point": 0}, "INT8", -128),
    ({"scale": "0.1", "zero_point": 0}, "UINT8", 255),
])
def test_malformed_grpc_request_answers_invalid_argument(served, heldout_codes, params, dtype, fill) -> None:
    _, contract, codes = heldout_codes
    params = {k: contract.contract_id if v == "CID" else v for k, v in params.items()}
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{served.grpc_port}")
    q = tgrpc.InferInput("bottleneck", [1, 4, 5, 5], dtype)
    q.set_data_from_numpy(np.full((1, 4, 5, 5), fill, dtype=dtype.lower()))
    with pytest.raises(InferenceServerException) as e:
        y = g.infer(served.model.name, [q], parameters=params).as_numpy("logits")
        pytest.fail(f"answered {y}")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value
    q.set_data_from_numpy(codes[:1] if dtype == "UINT8" else np.zeros((1, 4, 5, 5), np.int8))
    good = {"contract_id": contract.contract_id} if dtype == "UINT8" else {"scale": 0.1, "zero_point": 0}
    assert np.isfinite(g.infer(served.model.name, [q], parameters=good).as_numpy("logits")).all()


def test_client_disconnect_mid_request_logs_no_traceback(served, heldout_codes) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.error", "bottlefit", "bottlefit.serve")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", served.http_port), timeout=10) as s:
                s.sendall(f"POST /v2/models/{served.model.name}/infer HTTP/1.1\r\nHost: x\r\n"
                          "Content-Length: 100000\r\n\r\n".encode() + b"{" * 1000)
        _good_request(served, heldout_codes)
        time.sleep(0.5)  # the disconnects are noticed asynchronously; only the absence of a log line is asserted
        _good_request(served, heldout_codes)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], [r.getMessage() for r in records]


# -- 5. what `serve OUT` agrees to serve


def _copy(mini_export: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(mini_export, out)
    return out


def test_hidden_leftover_target_dirs_are_not_served(mini_export, tmp_path) -> None:
    from bottlefit.serve.model import ServedModel

    out = _copy(mini_export, tmp_path)
    shutil.copytree(out / "onnx", out / ".onnx.old-1234")  # what an interrupted re-export leaves
    m = ServedModel(out)
    try:
        assert [t.path.name for t in m.targets] == ["onnx"]
        assert m.tail_target.path.name == "onnx"
    finally:
        m.close()


def test_an_export_that_failed_parity_is_refused_unless_allow_failed(mini_export, tmp_path) -> None:
    from bottlefit.serve.model import ServedModel

    out = _copy(mini_export, tmp_path)
    mpath = out / "onnx" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["parity"]["passed"] = False
    manifest["parity"]["checks"][0]["passed"] = False
    mpath.write_text(json.dumps(manifest))
    check = manifest["parity"]["checks"][0]
    with pytest.raises(UserError, match=r"failed parity .*--allow-failed") as e:
        ServedModel(out).close()
    assert f"{check['artifact']} {check['metric']}" in str(e.value)
    m = ServedModel(out, allow_failed=True)
    try:
        assert len(m.warnings) == 1 and "failed parity" in m.warnings[0] and "--allow-failed" in m.warnings[0]
    finally:
        m.close()


# -- 6. gRPC concurrency is a flag


def test_grpc_max_concurrency_flag_bounds_calls_in_flight(mini_export, heldout_codes) -> None:
    from bottlefit.cli import build_parser
    from bottlefit.serve.server import ServeOptions, Server

    help_text = build_parser("serve")._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore
    assert re.search(r"--grpc-max-concurrency\s+\S+\s+gRPC calls in flight.*\(default\s+64\)", help_text, re.S)
    _, contract, codes = heldout_codes
    server = Server(mini_export, ServeOptions(http_port=0, grpc_port=0, grpc_max_concurrency=3)).start()
    gate = threading.Event()
    run = server.model.batcher.run
    server.model.batcher.run = lambda x: (gate.wait(60), run(x))[1]  # the tail holds its batches until released
    try:
        name, url = server.model.name, f"127.0.0.1:{server.grpc_port}"
        results: list[Any] = []

        def call(i: int) -> None:
            g = tgrpc.InferenceServerClient(url)
            q = tgrpc.InferInput("bottleneck", [1, 4, 5, 5], "UINT8")
            q.set_data_from_numpy(codes[i : i + 1])
            results.append((i, g.infer(name, [q], parameters={"contract_id": contract.contract_id})
                            .as_numpy("logits")))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for _ in range(400):  # all three decoded and waiting on the tail
            if server.model.stats.d["compute_input"][0] >= 3:
                break
            time.sleep(0.05)
        assert server.model.stats.d["compute_input"][0] == 3
        g = tgrpc.InferenceServerClient(url)
        q = tgrpc.InferInput("bottleneck", [1, 4, 5, 5], "UINT8")
        q.set_data_from_numpy(codes[:1])
        with pytest.raises(InferenceServerException) as e:
            g.infer(name, [q], parameters={"contract_id": contract.contract_id})
        assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        gate.set()
        for t in threads:
            t.join(60)
        want = _want(server, contract, codes[:3])
        assert sorted(i for i, _ in results) == [0, 1, 2]
        for i, y in results:
            assert np.array_equal(y[0], want[i])
        assert np.array_equal(g.infer(name, [q], parameters={"contract_id": contract.contract_id})
                              .as_numpy("logits"), want[:1])
    finally:
        gate.set()
        server.stop()


# -- 7. TLS (REST and gRPC) and a bearer token


TOKEN = "s3cret-token_for.tests"


@pytest.fixture(scope="module")
def tls_server(mini_export, certificate) -> Iterator[Any]:
    from bottlefit.serve.server import ServeOptions, Server

    cert, key = certificate
    server = Server(mini_export, ServeOptions(http_port=0, grpc_port=0, tls_cert=cert, tls_key=key,
                                              token=TOKEN)).start()
    yield server
    server.stop()


def test_tls_and_token_with_tritonclient_on_both_ports(tls_server, certificate, heldout_codes) -> None:
    cert, _ = certificate
    _, contract, codes = heldout_codes
    name, want = tls_server.model.name, _want(tls_server, contract, codes)
    assert tls_server.http_url.startswith("https://")
    ctx = ssl.create_default_context(cafile=str(cert))
    auth = {"Authorization": f"Bearer {TOKEN}"}

    # REST: health open; everything else needs the token; plain http is refused
    with urllib.request.urlopen(f"{tls_server.http_url}/v2/health/ready", timeout=10, context=ctx) as r:
        assert r.status == 200
    body, hl, _ = build_request(contract, codes[0], "int8", "bottleneck", None)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        status, resp, _ = _post(_infer_url(tls_server), body, hl, headers, ctx)
        assert status == 401 and "bearer token" in resp["error"], (headers, status, resp)
    status, resp, binary = _post(_infer_url(tls_server), body, hl, auth, ctx)
    assert status == 200 and np.array_equal(logits_of(resp, binary), want[:1])
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{tls_server.http_port}/v2/health/live", timeout=10)
    with pytest.raises((urllib.error.URLError, ssl.SSLError)):  # a client that does not trust the certificate
        urllib.request.urlopen(f"{tls_server.http_url}/v2/health/live", timeout=10,
                               context=ssl.create_default_context())

    http = thttp.InferenceServerClient(f"127.0.0.1:{tls_server.http_port}", ssl=True,
                                       ssl_options={"ca_certs": str(cert)})
    assert http.is_server_live()
    q = thttp.InferInput("bottleneck", list(codes.shape), "UINT8")
    q.set_data_from_numpy(codes, binary_data=True)
    with pytest.raises(InferenceServerException, match="bearer token"):
        http.infer(name, [q], parameters={"contract_id": contract.contract_id})
    y = http.infer(name, [q], parameters={"contract_id": contract.contract_id}, headers=auth).as_numpy("logits")
    assert np.array_equal(y, want)

    # gRPC over TLS, the token as metadata
    g = tgrpc.InferenceServerClient(f"127.0.0.1:{tls_server.grpc_port}", ssl=True, root_certificates=str(cert))
    assert g.is_server_live() and g.is_model_ready(name)
    gq = tgrpc.InferInput("bottleneck", list(codes.shape), "UINT8")
    gq.set_data_from_numpy(codes)
    for headers in (None, {"authorization": "Bearer wrong"}):
        with pytest.raises(InferenceServerException) as e:
            g.infer(name, [gq], parameters={"contract_id": contract.contract_id}, headers=headers)
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as e:
        g.get_model_metadata(name)
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"
    y = g.infer(name, [gq], parameters={"contract_id": contract.contract_id},
                headers={"authorization": f"Bearer {TOKEN}"}).as_numpy("logits")
    assert np.array_equal(y, want)
    plain = tgrpc.InferenceServerClient(f"127.0.0.1:{tls_server.grpc_port}")
    with pytest.raises(InferenceServerException) as e:
        plain.is_server_live()
    assert e.value.status() == "StatusCode.UNAVAILABLE"


def test_project_client_with_ca_file_and_token(tls_server, certificate, mini_export, heldout_codes,
                                               tmp_path) -> None:
    from bottlefit.serve.client import Client

    cert, _ = certificate
    _, contract, codes = heldout_codes
    x = np.zeros((3, 32, 32), np.float32)
    ok = Client(mini_export / "onnx", tls_server.http_url, ca_file=cert, token=TOKEN, retries=0).run_one("x", x)
    assert ok.ok, ok.error
    no_token = Client(mini_export / "onnx", tls_server.http_url, ca_file=cert, retries=0).run_one("x", x)
    assert not no_token.ok and "HTTP 401" in no_token.error and no_token.attempts == 1
    untrusted = Client(mini_export / "onnx", tls_server.http_url, token=TOKEN, retries=2).run_one("x", x)
    assert not untrusted.ok and "--ca-file" in untrusted.error and untrusted.attempts == 1
    # the command: the token from a file
    (tmp_path / "token").write_text(TOKEN + "\n")
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    r = _run_cli(["run-head", str(mini_export / "onnx"), str(img), "--server", tls_server.http_url, "--ca-file",
                  str(cert), "--token-file", str(tmp_path / "token"), "--json", "--retries", "0"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["ok"] is True


def test_serve_command_with_tls_and_the_token_from_the_environment(serve_process, certificate, served,
                                                                   heldout_codes, tmp_path) -> None:
    cert, key = certificate
    ctx = ssl.create_default_context(cafile=str(cert))
    srv = serve_process("--tls-cert", str(cert), "--tls-key", str(key), tmp=tmp_path,
                        env={"BOTTLEFIT_SERVE_TOKEN": TOKEN}, context=ctx)
    assert srv.http_url.startswith("https://127.0.0.1:") and "TLS, bearer token" in "".join(srv.lines)
    _, contract, codes = heldout_codes
    body, hl, _ = build_request(contract, codes[0], "int8", "bottleneck", None)
    url = f"{srv.http_url}/v2/models/{served.model.name}/infer"
    assert _post(url, body, hl, context=ctx)[0] == 401
    status, resp, binary = _post(url, body, hl, {"Authorization": f"Bearer {TOKEN}"}, ctx)
    assert status == 200 and np.array_equal(logits_of(resp, binary), _want(served, contract, codes[:1]))
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0


def test_serve_cli_reads_the_token_file_and_refuses_half_a_tls_pair(mini_export, certificate, tmp_path) -> None:
    cert, _ = certificate
    r = _run_cli(["serve", str(mini_export), "--http-port", "0", "--grpc-port", "0", "--tls-cert", str(cert)],
                 tmp_path, timeout=60)
    assert r.returncode == 2 and "--tls-key" in r.stderr, r.stderr
    r = _run_cli(["serve", str(mini_export), "--http-port", "0", "--grpc-port", "0", "--token-file",
                  str(tmp_path / "missing")], tmp_path, timeout=60)
    assert r.returncode == 2 and "--token-file" in r.stderr, r.stderr


# -- 8. the server loads no torch


def test_serve_process_loads_no_torch(serve_process, served, heldout_codes, tmp_path) -> None:
    srv = serve_process(tmp=tmp_path)
    _, contract, codes = heldout_codes
    tables = load_tables(served.model.tail_target, contract)
    body, hl, _ = build_request(contract, codes[0], "context", "bottleneck", tables)
    status, resp, _ = _post(f"{srv.http_url}/v2/models/{served.model.name}/infer", body, hl)
    assert status == 200, resp
    maps = Path(f"/proc/{srv.proc.pid}/maps").read_text() if Path("/proc").is_dir() else ""
    assert "libtorch" not in maps and "torch/_C" not in maps
    srv.proc.send_signal(signal.SIGINT)
    assert srv.proc.wait(60) == 0
    script = ("import sys\nfrom pathlib import Path\nfrom bottlefit.serve.server import ServeOptions, Server\n"
              f"s = Server(Path({str(served.model.tail_target.path.parent)!r}), ServeOptions(http_port=0, "
              "grpc_port=0)).start()\ns.stop()\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'tensorflow')))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(tmp_path), cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
