from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from bottlefit.cli import main
from bottlefit.serve.client import Client


def _images(tmp_path: Path, n: int = 3) -> list[str]:
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_run_head_matches_in_process_split(served, mini_export: Path, tmp_path: Path, capsys) -> None:
    from bottlefit.calibration.dataset import load_image
    from bottlefit.runtimes.head import run_tail

    images = _images(tmp_path)
    for wire in ("fp32", "int8", "context"):
        client = Client(mini_export / "onnx", served.http_url, wire=wire, reference=True)
        results = list(client.run(images))
        assert all(r.ok for r in results), [r.error for r in results]
        card = client.target.card
        for r, path in zip(results, images, strict=True):
            codes = client.head(load_image(path, card)[None])
            want = run_tail(client.target.tail(), client.target.path, client.contract.dequantize(codes))[0]
            assert np.array_equal(r.logits, want)
            assert r.coded_bytes > 0 and r.round_trip_ms > 0 and len(r.topk) == 5
    rc = main(["run-head", str(mini_export / "onnx"), *images, "--server", served.http_url, "--json",
               "--wire", "zstd", "--reference"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(lines) == 3 and all(x["ok"] and x["topk"] for x in lines)


def test_failed_images_are_reported_not_dropped(mini_export: Path, tmp_path: Path, capsys) -> None:
    """An unreachable server is the environment's problem: every image is still reported, and the exit is 3
    (errors.py), not 1 ("verification failed")."""
    images = _images(tmp_path, 2)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    # nothing listens on port 9 of 127.0.0.1: each image is retried with backoff, then reported as failed
    rc = main(["run-head", str(mini_export / "onnx"), *images, str(bad), "--server", "http://127.0.0.1:9",
               "--retries", "2", "--timeout", "1"])
    out = capsys.readouterr()
    assert rc == 3
    assert out.out.count("FAILED after 3 attempt(s)") == 2 and "broken.png: FAILED" in out.out
    assert out.err.splitlines()[-1].startswith("bottlefit: cannot run here: 3 of 3 image(s) failed")
    assert "could not be reached" in out.err


def test_missing_image_is_the_users_exit_2_before_any_request(mini_export: Path, tmp_path: Path, capsys) -> None:
    images = _images(tmp_path, 1)
    rc = main(["run-head", str(mini_export / "onnx"), *images, str(tmp_path / "nope.png"),
               "--server", "http://127.0.0.1:9", "--retries", "0", "--timeout", "1"])
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""  # nothing was run or sent
    assert out.err == f"bottlefit: error: {tmp_path / 'nope.png'}: no such image file; check the path\n"


def test_unreadable_image_is_the_users_exit_2(served, mini_export: Path, tmp_path: Path, capsys) -> None:
    images = _images(tmp_path, 1)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    rc = main(["run-head", str(mini_export / "onnx"), *images, str(bad), "--server", served.http_url])
    out = capsys.readouterr()
    assert rc == 2
    assert "img0.png: head" in out.out and "broken.png: FAILED" in out.out
    assert out.err.splitlines()[-1].startswith("bottlefit: error: 1 of 2 image(s) failed")


def test_progress_bar_on_a_terminal_only(served, mini_export: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """run-head draws a progress bar on stderr when stderr is a terminal, never in a pipe; the --json lines on
    stdout stay one JSON object each either way."""
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    images = _images(tmp_path, 2)
    args = ["run-head", str(mini_export / "onnx"), *images, "--server", served.http_url, "--json"]
    assert main(args) == 0
    piped = capsys.readouterr()
    assert "2/2" not in piped.err and "\r" not in piped.err
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(args) == 0
    out = capsys.readouterr().out
    for lines in (piped.out, out):
        recs = [json.loads(x) for x in lines.splitlines()]
        assert len(recs) == 2 and all(r["ok"] for r in recs)
    assert "2/2" in term.getvalue() and "image" in term.getvalue()  # tqdm's "n/total" with the unit


def test_kserve_datatypes_are_one_table_the_server_and_the_board_clients_read(tmp_path: Path) -> None:
    """boardhttp.V2_TYPES (copied into every board bundle) names each payload's datatype for the host client, both
    board clients and the server: the rpi client's fp32 and int8 bodies carry its names, and the server reads each
    name as the dtype it was named from."""
    import importlib
    import shutil
    import sys

    from bottlefit.serve import boardhttp
    from bottlefit.serve.export import BOARD_CLIENT, BOARD_MODULES
    from bottlefit.serve.model import DTYPES
    from bottlefit.targets.rpi import BOARD_DIR

    for name, v2 in boardhttp.V2_TYPES.items():
        assert DTYPES[v2] == np.dtype(name)
    shutil.copyfile(BOARD_CLIENT, tmp_path / "client.py")  # as the bundle ships it
    for f in (BOARD_DIR / "boardhead.py", BOARD_DIR / "run_head.py", *BOARD_MODULES):
        shutil.copyfile(f, tmp_path / f.name)
    modules = ("client", "boardhead", "run_head", "boardcodec", "boardhttp")
    sys.path.insert(0, str(tmp_path))
    try:
        for m in modules:
            sys.modules.pop(m, None)
        client = importlib.import_module("client")
        wire = {"scale": 0.5, "zero_point": 3, "layout": "NCHW"}
        for codes, kind, v2 in ((np.zeros((1, 2, 3, 3), np.int8), "int8", "INT8"),
                                (np.zeros((1, 2, 3, 3), np.uint8), "int8", "UINT8"),
                                (np.zeros((1, 2, 3, 3), np.int8), "fp32", "FP32")):
            body, n, payload = client.request_body(wire, codes, kind, "bottleneck")
            assert json.loads(body[:n])["inputs"][0]["datatype"] == v2
            assert len(body) - n == payload == codes.size * DTYPES[v2].itemsize
        assert client.V2_TYPES is sys.modules["boardhttp"].V2_TYPES  # the bundle's copy of the one table
    finally:
        sys.path.remove(str(tmp_path))
        for m in modules:
            sys.modules.pop(m, None)


def test_topk_is_classes_with_their_softmax_probabilities(served, mini_export: Path, tmp_path: Path, capsys) -> None:
    """run-head (and the boards' clients: one function) print probabilities, most likely first, and say so; the
    JSON lines keep the logits beside them."""
    from bottlefit.serve.boardhttp import topk

    logits = np.array([2.0, -1.0, 0.5, 2.0, 7.0])
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert [c for c, _, _ in topk(logits, 5)] == [4, 0, 3, 2, 1]  # ties keep class order
    np.testing.assert_allclose([q for _, q, _ in topk(logits, 5)], p[[4, 0, 3, 2, 1]], rtol=1e-12)
    assert [s for _, _, s in topk(logits, 2)] == [7.0, 2.0] and len(topk(logits, 9)) == 5
    images = _images(tmp_path, 1)
    assert main(["run-head", str(mini_export / "onnx"), *images, "--server", served.http_url, "--topk", "3"]) == 0
    line = capsys.readouterr().out.strip()
    assert "top-k class:probability " in line
    shown = [float(x.split(":")[1]) for x in line.split("top-k class:probability ")[1].split()]
    assert len(shown) == 3 and shown == sorted(shown, reverse=True) and 0 < sum(shown) <= 1.0005
    assert main(["run-head", str(mini_export / "onnx"), *images, "--server", served.http_url, "--json"]) == 0
    (rec,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    top = rec["topk"]
    assert [sorted(t) for t in top] == [["class", "logit", "probability"]] * 5
    assert top[0]["probability"] == max(t["probability"] for t in top) and top[0]["logit"] >= top[1]["logit"]
