"""The rpi bundle's own client (standard library + numpy): the head's int8 codes to `bottlefit serve` and back,
on this host and on the Pi's own ISA under arm64 emulation, with the logits the tail gives for those codes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bottlefit.exporter.artifact import Artifact
from bottlefit.runtimes.head import run_tail


@pytest.fixture(scope="module")
def split_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mini_resnet export for onnx (the tail), rpi and jetson (the heads and the board bundles), in one OUT."""
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.jetson import JetsonOptions

    out = tmp_path_factory.mktemp("split") / "out"
    for target, opts in (("onnx", None), ("rpi", None), ("jetson", JetsonOptions(profile="orin"))):
        export(ExportRequest(ModelSource(untrained=True, arch="mini_resnet", bottleneck_channel=4), target, out,
                             opts, parity=ParityOptions(emulate=Emulate.parse("none"))), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def server(split_export: Path) -> Iterator[object]:
    from bottlefit.serve.server import ServeOptions, Server

    s = Server(split_export, ServeOptions(http_port=0, grpc_port=0)).start()
    yield s
    s.stop()


def _tail_logits(out: Path, codes: np.ndarray, wire: dict, layout: str) -> np.ndarray:
    """What the tail gives for these codes, in process: dequantize exactly as the contract says."""
    x = (codes.astype(np.float32) - np.float32(wire["zero_point"])) * np.float32(wire["scale"])
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    manifest = json.loads((out / "onnx" / "manifest.json").read_text())
    tail = next(Artifact.from_dict(a) for a in manifest["artifacts"] if a["file"] == "tail.onnx")
    return run_tail(tail, out / "onnx", np.ascontiguousarray(x))


def _records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_board_client_on_this_host(split_export: Path, server, tmp_path: Path) -> None:
    board = split_export / "rpi" / "board"
    args = ["--golden", "--runtime", "litert", "--threads", "1"]
    cp = subprocess.run([sys.executable, str(board / "client.py"), "--server", server.http_url, "--json", *args],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    recs = _records(cp.stdout)
    assert len(recs) == 4 and all(r["payload_bytes"] == 4 * 5 * 5 for r in recs)  # int8 codes: 1 byte each
    # the same head on the same kernels writes these codes; the server's logits are the tail's for them
    payload = tmp_path / "p.bin"
    subprocess.run([sys.executable, str(board / "run_head.py"), *args, "--runs", "1", "--out", str(payload)],
                   check=True, capture_output=True, timeout=120)
    meta = json.loads((board / "golden.json").read_text())
    entry = next(m for m in meta["models"] if m["runtime"] == "litert")
    codes = np.frombuffer(payload.read_bytes(), dtype=np.int8).reshape(4, *entry["output"]["shape"][1:])
    want = _tail_logits(split_export, codes, entry["output"], "NHWC")
    np.testing.assert_allclose(np.array([r["logits"] for r in recs]), want, rtol=0, atol=1e-5)


def test_board_client_over_tls_with_a_token(split_export: Path, certificate, tmp_path: Path) -> None:
    """--ca-file and --token-file: the board's transport (boardhttp.py) to a server with TLS and a bearer token."""
    from bottlefit.serve.server import ServeOptions, Server

    cert, key = certificate
    (tmp_path / "token").write_text("board-token\n")
    s = Server(split_export, ServeOptions(http_port=0, grpc_port=0, tls_cert=cert, tls_key=key,
                                          token="board-token")).start()
    try:
        board = split_export / "rpi" / "board"
        args = [sys.executable, str(board / "client.py"), "--server", s.http_url, "--golden", "--runtime", "litert",
                "--json", "--retries", "0", "--ca-file", str(cert)]
        cp = subprocess.run([*args, "--token-file", str(tmp_path / "token")], capture_output=True, text=True,
                            timeout=120)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert len(_records(cp.stdout)) == 4
        cp = subprocess.run(args, capture_output=True, text=True, timeout=120)  # no token
        assert cp.returncode == 1
        assert [r["error"][:8] for r in _records(cp.stdout)] == ["HTTP 401"] * 4
        cp = subprocess.run([*args[:-2], "--token-file", str(tmp_path / "token")], capture_output=True, text=True,
                            timeout=120)  # the certificate not trusted: one attempt, a line naming --ca-file
        assert cp.returncode == 1
        assert all("--ca-file" in r["error"] for r in _records(cp.stdout))
    finally:
        s.stop()


def test_board_client_refused_for_another_export(split_export: Path, server, tmp_path: Path) -> None:
    bundle = tmp_path / "rpi"
    subprocess.run(["cp", "-r", str(split_export / "rpi"), str(bundle)], check=True)
    config = json.loads((bundle / "board" / "client.json").read_text())  # the wire contracts the client sends
    for m in config["heads"]:
        m["contract_id"] = "0" * 12
    (bundle / "board" / "client.json").write_text(json.dumps(config))
    cp = subprocess.run([sys.executable, str(bundle / "board" / "client.py"), "--server", server.http_url,
                         "--golden", "--runtime", "litert", "--json", "--retries", "0"],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 1
    errors = [r["error"] for r in _records(cp.stdout)]
    assert len(errors) == 4 and all("HTTP 400" in e and "contract_id" in e for e in errors)


@pytest.mark.slow
def test_board_client_on_the_emulated_pi(split_export: Path, server, tmp_path: Path) -> None:
    """The Pi's Python and aarch64 wheels (the profile's default head, ncnn int8) against the server on this host's
    loopback: the codes are the reference codes exactly, and so are the logits."""
    from bottlefit.emulation.arm64 import EmulationUnavailable, ensure_sysroot, get_core, run_python

    try:
        sysroot = ensure_sysroot()
    except EmulationUnavailable as e:
        pytest.skip(f"arm64 emulation unavailable here: {e}")
    board = split_export / "rpi" / "board"
    cp = run_python(sysroot, get_core("pi4"), board / "client.py", ["--server", server.http_url, "--golden", "--json"],
                    cwd=tmp_path, timeout=300)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    recs = _records(cp.stdout)
    meta = json.loads((board / "golden.json").read_text())
    entry = next(m for m in meta["models"] if m["runtime"] == meta["default_runtime"])
    assert entry["runtime"] == "ncnn" and len(recs) == 4 and all(r["payload_bytes"] == 100 for r in recs)
    w = entry["wire"]
    ref = np.load(board / entry["outputs_file"])
    codes = np.clip(np.round(ref / np.float32(w["scale"])) + w["zero_point"], -128, 127).astype(np.int8)
    np.testing.assert_allclose(np.array([r["logits"] for r in recs]), _tail_logits(split_export, codes, w, "NCHW"),
                               rtol=0, atol=1e-5)


def test_board_client_sends_context_frames(split_export: Path, server, tmp_path: Path) -> None:
    """--wire context: the bundle's own coder (boardcodec.py, the export's tables) -> a BYTES frame that the server
    decodes bit-exactly: the same logits as the int8 tensor of the same codes."""
    board = split_export / "rpi" / "board"
    args = ["--golden", "--runtime", "litert", "--threads", "1", "--json", "--server", server.http_url]
    runs = {w: subprocess.run([sys.executable, str(board / "client.py"), *args, "--wire", w], capture_output=True,
                              text=True, timeout=120) for w in ("int8", "context")}
    assert all(cp.returncode == 0 and "deprecated" not in cp.stderr for cp in runs.values()), \
        {w: cp.stderr for w, cp in runs.items()}
    plain, coded = _records(runs["int8"].stdout), _records(runs["context"].stdout)
    assert len(coded) == 4 and all(r["payload_bytes"] > 0 and r["encode_ms"] >= 0 for r in coded)
    np.testing.assert_array_equal(np.array([r["logits"] for r in coded]), np.array([r["logits"] for r in plain]))


def test_jetson_client_sends_the_engine_outputs(split_export: Path, server) -> None:
    """The jetson bundle's client (Python 3.6, stdlib + numpy) with the golden engine output (what trtexec writes
    for the golden input): int8 and context-coded, the logits the tail gives for those codes."""
    d = split_export / "jetson"
    (meta,) = json.loads((d / "client.json").read_text())["heads"]
    y = np.fromfile(d / "golden" / "output.bottleneck.bin", dtype="<f4").reshape(1, *meta["shape"])
    codes = np.clip(np.round(y / meta["scale"]) + meta["zero_point"], -128, 127).astype(np.int8)
    want = _tail_logits(split_export, codes, meta, "NCHW")
    sizes = {}
    for codec in ("none", "context"):
        cp = subprocess.run([sys.executable, str(d / "client.py"), "--server", server.http_url, "--json",
                             "--bottleneck", str(d / "golden" / "output.bottleneck.bin"), "--wire",
                             {"none": "int8", "context": "context"}[codec]],
                            capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        (rec,) = _records(cp.stdout)
        sizes[codec] = rec["payload_bytes"]
        np.testing.assert_allclose(np.array([rec["logits"]]), want, rtol=0, atol=1e-5)
    assert sizes["none"] == 100 and sizes["context"] > 31  # int8: 1 byte per code; a frame: its 31-byte header
    cp = subprocess.run([sys.executable, str(d / "client.py"), "--server", server.http_url, "--golden"],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 2 and "--engine" in cp.stderr  # the head runs in TensorRT: one line says so


def test_board_clients_run_on_python36() -> None:
    """vermin: the one board client, the jetson's part of it and the codec and transport it ships run on JetPack
    4's Python 3.6."""
    import shutil

    from bottlefit.serve.export import BOARD_CLIENT, BOARD_MODULES
    from bottlefit.targets.jetson import BOARD_HEAD_MODULE

    vermin = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    if not Path(vermin).exists():
        pytest.skip("vermin is not installed (pip install vermin==1.9.2)")
    files = [str(f) for f in (BOARD_CLIENT, BOARD_HEAD_MODULE, *BOARD_MODULES)]
    cp = subprocess.run([vermin, "-t=3.6-", "--no-tips", "--violations", *files],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_jetson_client_sends_int8_codes_as_they_are(split_export: Path, server, tmp_path: Path) -> None:
    """An engine with int8 outputs hands the client the codes themselves: a .bin of one byte per element or an int8
    .npy goes on the wire as those codes (the same logits as the float output they stand for)."""
    d = split_export / "jetson"
    (meta,) = json.loads((d / "client.json").read_text())["heads"]
    y = np.fromfile(d / "golden" / "output.bottleneck.bin", dtype="<f4").reshape(1, *meta["shape"])
    codes = np.clip(np.round(y / meta["scale"]) + meta["zero_point"], -128, 127).astype(np.int8)
    codes.tofile(tmp_path / "codes.bin")
    np.save(tmp_path / "codes.npy", codes)
    logits = []
    for f in (d / "golden" / "output.bottleneck.bin", tmp_path / "codes.bin", tmp_path / "codes.npy"):
        cp = subprocess.run([sys.executable, str(d / "client.py"), "--server", server.http_url, "--json",
                             "--bottleneck", str(f)], capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        (rec,) = _records(cp.stdout)
        assert rec["payload_bytes"] == codes.size  # one byte per code, whatever the file held
        logits.append(rec["logits"])
    np.testing.assert_array_equal(logits[1], logits[0])
    np.testing.assert_array_equal(logits[2], logits[0])
    (tmp_path / "short.bin").write_bytes(b"\0" * (codes.size - 1))  # neither the codes nor float32
    cp = subprocess.run([sys.executable, str(d / "client.py"), "--server", server.http_url, "--json",
                         "--bottleneck", str(tmp_path / "short.bin"), "--retries", "0"],
                        capture_output=True, text=True, timeout=60)
    (rec,) = _records(cp.stdout)
    assert cp.returncode == 1 and "holds 24 values" in rec["error"]


def test_jetson_head_reads_codes_an_int8_output_engine_prints() -> None:
    """trtexec prints an int8 output's codes as numbers: the client rounds them back to the codes themselves."""
    import importlib.util

    from bottlefit.targets.jetson import BOARD_HEAD_MODULE

    spec = importlib.util.spec_from_file_location("jetson_boardhead", BOARD_HEAD_MODULE)
    assert spec is not None and spec.loader is not None
    head = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(head)
    wire = {"dtype": "int8", "scale": 0.5, "zero_point": 0, "head_outputs_codes": True}
    printed = np.array([-128.0, -3.0000002, 0.0, 126.99999, 127.0], dtype=np.float32)
    np.testing.assert_array_equal(head.codes_of(printed, wire), np.array([-128, -3, 0, 127, 127], np.int8))
    floats = np.float32(0.5) * np.array([-128, -3, 0, 127], np.float32)  # a float output on the codes' grid
    np.testing.assert_array_equal(head.codes_of(floats, dict(wire, head_outputs_codes=False)),
                                  np.array([-128, -3, 0, 127], np.int8))
    codes = np.array([1, -2], np.int8)
    assert head.codes_of(codes, wire) is codes  # the codes themselves pass as they are


def test_both_bundles_ship_one_client_with_the_wire_contracts_of_their_heads(split_export: Path) -> None:
    """The jetson and rpi bundles carry the same client, transport and coder byte for byte (only boardhead.py, the
    board's runtime, differs), and client.json binds each head to the contract id and tables golden.json and the
    manifest name."""
    from bottlefit.serve.contract import load_target

    jetson, board = split_export / "jetson", split_export / "rpi" / "board"
    for f in ("client.py", "boardhttp.py", "boardcodec.py"):
        assert (jetson / f).read_bytes() == (board / f).read_bytes(), f
    assert (jetson / "boardhead.py").read_bytes() != (board / "boardhead.py").read_bytes()
    config = json.loads((board / "client.json").read_text())
    golden = json.loads((board / "golden.json").read_text())
    assert {h["head"]: (h["contract_id"], h["codec_tables"]) for h in config["heads"]} == \
        {m["model"]: (m["contract_id"], m["codec_tables"]) for m in golden["models"]}
    served = {c.head: c.contract_id for c in load_target(split_export / "rpi").contracts}
    assert {h["head"][3:]: h["contract_id"] for h in config["heads"]} == \
        {k: v for k, v in served.items() if k in {h["head"][3:] for h in config["heads"]}}
    assert config["tail_model"] == json.loads((jetson / "client.json").read_text())["tail_model"] == "mini_resnet_tail"
