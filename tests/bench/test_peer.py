"""The bench's two link ends on loopback, without namespaces: the server peer as its own process speaking JSON
lines (ready with one relay port per link and mode, ``take``, ``quit``), the device side in this process, and the
records each writes (the modes' rotating order, payload bytes, top-1, what the relays saw)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bottlefit.bench.peer import MODES, Counter, Device, DeviceSpec, LinkSpec, ServerSpec
from bottlefit.bench.service import decode_jpeg, full_model_name
from bottlefit.bench.split import Model, full_onnx, load_images
from bottlefit.runtimes import get_runner
from bottlefit.serve.contract import find_targets, tail_model_name

IMAGES, REPEATS = 2, 2


class Proc:
    def __init__(self, role: str, spec: ServerSpec | DeviceSpec, d: Path) -> None:
        (d / f"{role}.json").write_text(spec.to_json())
        self.proc = subprocess.Popen([sys.executable, "-m", "bottlefit.bench.peer", role, str(d / f"{role}.json")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()


@pytest.fixture(scope="module")
def setup(export_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("peer")
    card = find_targets(export_root)[0].card
    model = Model(export_root, card, "", "agreement")
    imgs = load_images(model, IMAGES)
    np.savez(d / "images.npz", x=imgs.x, rgb=imgs.rgb)
    return {"dir": d, "card": card, "full": full_onnx(model, d / "full.onnx"), "x": imgs.x, "rgb": imgs.rgb}


@pytest.fixture(scope="module")
def server(setup: dict[str, Any], export_root: Path) -> Iterator[tuple[Proc, dict[str, Any]]]:
    spec = ServerSpec(export=str(export_root), full=str(setup["full"]), card=setup["card"], bind="127.0.0.1",
                      relay_delays=False, links=(LinkSpec("3g", 150.0, 2.0), LinkSpec("5g", 20.0, 100.0)))
    p = Proc("server", spec, setup["dir"])
    ready = p.read()
    yield p, ready
    if p.proc.poll() is None:
        p.proc.stdin.close()  # end of input ends it, as quit does
        p.proc.wait(timeout=30)


def test_server_announces_a_relay_per_link_and_mode(server: tuple[Proc, dict[str, Any]], setup) -> None:
    _, ready = server
    assert ready["ready"] is True
    assert sorted(ready["ports"]) == ["3g/offload", "3g/split", "5g/offload", "5g/split"]
    assert len(set(ready["ports"].values())) == 4
    assert ready["split_model"] == tail_model_name(setup["card"]) == "mini_resnet_tail"
    assert ready["full_model"] == full_model_name(setup["card"]) == "mini_resnet_full"


def test_device_runs_every_mode_in_rotation(server: tuple[Proc, dict[str, Any]], setup, export_root: Path) -> None:
    proc, ready = server
    dev = Device(DeviceSpec(export=str(export_root), full=str(setup["full"]),
                            images=str(setup["dir"] / "images.npz"), srv_addr="127.0.0.1",
                            split_model=ready["split_model"], full_model=ready["full_model"], wire="int8",
                            jpeg_quality=90, modes=MODES))
    ports = {m: ready["ports"][f"5g/{m}"] for m in ("offload", "split")}
    recs = dev.run({"cmd": "run", "ports": ports, "images": IMAGES, "repeats": REPEATS})
    # each image: the modes from (image + repeat) onwards, so none always follows another
    assert [(r["rep"], r["image"], r["mode"]) for r in recs] == [
        (0, 0, "local"), (0, 0, "offload"), (0, 0, "split"), (0, 1, "offload"), (0, 1, "split"), (0, 1, "local"),
        (1, 0, "offload"), (1, 0, "split"), (1, 0, "local"), (1, 1, "split"), (1, 1, "local"), (1, 1, "offload")]
    assert all(r["ok"] for r in recs) and all(r["link_bytes"] is None for r in recs if r["mode"] != "local")

    full = get_runner("onnxruntime", setup["full"], num_threads=1)
    card = setup["card"]
    contract = next(c for c in find_targets(export_root)[0].contracts if c.quantized)
    for r in recs:
        i = r["image"]
        if r["mode"] == "local":
            assert r["payload_bytes"] == 0 and r["net_ms"] == 0.0
            want = full.infer({full.input_names[0]: setup["x"][i : i + 1]})[full.output_names[0]]
            assert r["top1"] == int(np.argmax(want[0]))
        elif r["mode"] == "offload":
            buf = io.BytesIO()
            Image.fromarray(setup["rgb"][i]).save(buf, format="JPEG", quality=90)
            assert r["payload_bytes"] == buf.tell() and r["attempts"] == 1
            # the server's answer for what it decoded: the whole model on the JPEG's pixels
            x = card.normalize(decode_jpeg(buf.getvalue(), card)[None])
            assert r["top1"] == int(np.argmax(full.infer({full.input_names[0]: x})[full.output_names[0]][0]))
        else:
            assert r["payload_bytes"] == int(np.prod(contract.shape))  # one int8 code per element
            assert r["head_ms"] > 0 and r["attempts"] == 1

    # the server side's relays saw exactly those requests: one exchange each, the same tensor bytes
    records = proc.ask({"cmd": "take"})["records"]
    assert {k: len(v) for k, v in records.items()} == {"3g/offload": 0, "3g/split": 0,
                                                       "5g/offload": IMAGES * REPEATS, "5g/split": IMAGES * REPEATS}
    sent = sorted(r["payload_bytes"] + 4 for r in recs if r["mode"] == "offload")  # BYTES: a u32 length each
    assert sorted(x["binary_bytes"] for x in records["5g/offload"]) == sent
    assert {x["binary_bytes"] for x in records["5g/split"]} == {int(np.prod(contract.shape))}
    assert proc.ask({"cmd": "take"})["records"]["5g/split"] == []


def test_quit_ends_the_server(server: tuple[Proc, dict[str, Any]]) -> None:
    proc, _ = server
    assert proc.proc.stdin is not None
    proc.proc.stdin.write('{"cmd": "quit"}\n')
    proc.proc.stdin.flush()
    assert proc.proc.wait(timeout=60) == 0


def test_a_failing_side_says_why_on_its_last_line(tmp_path: Path) -> None:
    p = Proc("device", DeviceSpec(export=str(tmp_path), full=str(tmp_path / "full.onnx"),
                                  images=str(tmp_path / "missing.npz"), srv_addr="127.0.0.1", split_model="m_tail",
                                  full_model="m_full", wire="int8", jpeg_quality=90), tmp_path)
    out, err = p.proc.communicate(timeout=120)
    assert p.proc.returncode == 1
    msg = json.loads(out.strip().splitlines()[-1])
    assert msg["error"].startswith("device: FileNotFoundError: ") and "missing.npz" in msg["error"]
    assert "Traceback" in err  # the log keeps the whole story; the orchestrator shows the line


def test_counter_reads_both_directions() -> None:
    assert Counter(None).read() is None
    if not Path("/sys/class/net/lo/statistics").is_dir():
        pytest.skip("no loopback statistics in /sys here")
    counter = Counter("lo")
    before = counter.read()
    n = 100_000
    with socket.create_server(("127.0.0.1", 0)) as srv:
        with socket.create_connection(srv.getsockname()) as c, srv.accept()[0] as s:
            c.sendall(b"x" * n)
            got = 0
            while got < n:
                got += len(s.recv(65536))
    after = counter.read()
    assert before is not None and after is not None
    assert after - before >= 2 * n  # on lo every byte is sent and received: both directions count it


def test_specs_cross_the_process_boundary_with_the_same_keys(setup: dict[str, Any], tmp_path: Path) -> None:
    """The peers' start files: the keys the child reads, and a round trip to equal records (the card as the
    manifest writes it)."""
    server = ServerSpec(export="out", full="full.onnx", card=setup["card"], bind="10.0.0.1", relay_delays=True,
                        links=(LinkSpec("wifi", 10.0, 50.0),))
    doc = json.loads(server.to_json())
    assert sorted(doc) == ["bind", "card", "export", "full", "links", "relay_delays", "triton"]
    assert doc["card"] == setup["card"].to_dict() and doc["triton"] is None
    assert doc["links"] == [{"name": "wifi", "rtt_ms": 10.0, "rate_mbit": 50.0}]
    assert ServerSpec.from_json(server.to_json()) == server
    device = DeviceSpec(export="out", full="full.onnx", images="i.npz", srv_addr="10.0.0.1", split_model="a_tail",
                        full_model="a_full", wire="int8", jpeg_quality=90, iface="veth0", head="head.int8.onnx")
    doc = json.loads(device.to_json())
    assert sorted(doc) == ["export", "full", "full_model", "head", "iface", "images", "jpeg_quality", "modes",
                           "split_model", "srv_addr", "wire"]
    assert doc["modes"] == list(MODES)
    assert DeviceSpec.from_json(device.to_json()) == device
