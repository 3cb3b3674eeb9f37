"""``bottlefit bench split`` end to end: the quick bench over two emulated links (network namespaces where this
machine permits them, else the analytic model with its reason), and the invariants of its table."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from bottlefit.cli import main
from bottlefit.splitbench.links import NETNS_DIR, PREFIX, namespaces_unavailable

IMAGES = 3


@pytest.fixture(scope="module")
def bench(export_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, dict]:
    out = tmp_path_factory.mktemp("report")
    rc = main(["bench", "split", "--out", str(out), "--quick", "--no-tradeoff", "--export", str(export_root),
               "--links", "3g,5g", "--image-count", str(IMAGES), "--accuracy-image-count", str(IMAGES),
               "--wire", "int8", "--board", "pi4", "--device-factor", "6"])
    return rc, out, json.loads((out / "split.json").read_text())


@pytest.mark.slow
def test_runs_and_writes_the_report(bench: tuple[int, Path, dict]) -> None:
    rc, out, r = bench
    assert rc == 0
    assert r["schema"] == "bottlefit.splitbench.split/1"
    for f in ("split.md", "split.json"):
        assert (out / f).stat().st_size > 200
    for f in ("split_latency.png", "split_bytes.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "bench-logs").exists()
    setup = r["link_setup"]
    if namespaces_unavailable() is None:
        assert setup["kind"] == "netns" and setup["shaper"] in ("netem", "tbf")
        assert set(setup["applied"]) == {"3g", "5g"}
    else:
        assert setup["kind"] == "analytic" and setup["reason"]
    # the namespaces are gone after the run
    assert not list(NETNS_DIR.glob(f"{PREFIX}-{os.getpid()}-*"))
    # the table: 3 modes x 2 links, every request answered, the device class stated
    assert sorted((x["mode"], x["link"]) for x in r["rows"]) == sorted(
        (m, k) for m in ("local", "offload", "split") for k in ("3g", "5g"))
    assert all(x["requests"] == IMAGES and x["failed"] == 0 for x in r["rows"])
    assert r["device"] == {**r["device"], "name": "pi4", "factor": 6.0, "label": "x6 assumed"}
    assert {x["device_basis"] for x in r["rows"]} == {"assumed"}
    assert r["tradeoff"] == {"skipped": "--no-tradeoff"}
    assert r["headline"].startswith("3G, device pi4") and "JPEG q95" in r["headline"]
    rows = {(x["mode"], x["link"]): x for x in r["rows"]}
    for q in r["ratios"]:
        s, lo = rows[("split", q["link"])], rows[("local", q["link"])]
        assert q["split_vs_local_pct"] == pytest.approx(100 * (s["latency_ms_median"] / lo["latency_ms_median"] - 1))
    assert [q["link"] for q in r["ratios"]] == ["3g", "5g"]
    md = (out / "split.md").read_text()
    assert r["headline"] in md and "| split | 5G |" in md


@pytest.mark.slow
def test_bytes_are_what_the_client_sent(bench: tuple[int, Path, dict], export_root: Path) -> None:
    """Payload per request: the client's count equals the binary tensor bytes the server side's relay saw (JPEG and
    the int8 codes; BYTES tensors add a 4-byte length); offload's equals our own JPEG of the same crops; split's is
    the contract's C*H*W int8 codes; the link carried more than the payload (headers)."""
    from PIL import Image

    from bottlefit.serve.contract import find_targets
    from bottlefit.splitbench.split import Model, load_images

    _, _, r = bench
    target = find_targets(export_root)[0]
    contract = next(c for c in target.contracts if c.quantized)
    imgs = load_images(Model(export_root, target.card, "", "agreement"), IMAGES)
    jpegs = []
    for rgb in imgs.rgb:
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.tell())
    assert len(r["checks"]) == 4
    for c in r["checks"]:
        assert c["payload_matches_relay"] and c["relay_records"] == c["requests"] == IMAGES
        framing = 4 if c["mode"] == "offload" else 0
        assert c["relay_binary_bytes"] == [b + framing for b in c["client_payload_bytes"]]
        raw = r["raw"][c["link"]]["device"]
        sent = [x["payload_bytes"] for x in raw if x["mode"] == c["mode"]]
        if c["mode"] == "offload":
            assert sorted(sent) == sorted(jpegs)
        else:
            assert sent == [int(np.prod(contract.shape))] * IMAGES
    for x in r["rows"]:
        if x["mode"] == "local":
            assert x["payload_bytes_median"] == 0 and x["link_bytes_median"] == 0
        else:
            assert x["link_bytes_median"] > x["payload_bytes_median"] + 200


@pytest.mark.slow
def test_latency_grows_as_bandwidth_falls(bench: tuple[int, Path, dict]) -> None:
    _, _, r = bench
    rows = {(x["mode"], x["link"]): x for x in r["rows"]}
    for mode in ("offload", "split"):
        assert rows[(mode, "3g")]["latency_ms_median"] > rows[(mode, "5g")]["latency_ms_median"]
        # 3G's RTT alone (handshake + request) bounds its round trip from below
        assert rows[(mode, "3g")]["network_ms_median"] >= 2 * 150.0
        for link, rtt in (("3g", 150.0), ("5g", 20.0)):
            assert rows[(mode, link)]["link_model_ms_median"] > 2 * rtt
    for link in ("3g", "5g"):
        local = rows[("local", link)]
        # local sends nothing: its latency is the device's compute (host x the --device-factor)
        assert local["network_ms_median"] == 0
        assert local["latency_ms_median"] == pytest.approx(local["device_ms_median"], rel=1e-9)
        assert local["device_ms_median"] == pytest.approx(6.0 * local["device_ms_host_median"])


@pytest.mark.parametrize("args, needle", [
    (["--links", "3g,6g"], "unknown link profile '6g'"),
    (["--export", "/nonexistent/export"], "--export /nonexistent/export: no such directory"),
    (["--links", "3g", "--headline-link", "5g"], "--headline-link '5g' is not among --links"),
    (["--image-count", "0"], "--image-count 0: must be at least 1"),
])
def test_bad_input_is_one_line_exit_2(args: list[str], needle: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "split", "--out", str(tmp_path / "r"), "--no-tradeoff", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and needle in err
    assert not (tmp_path / "r").exists()


def test_without_root_the_links_are_analytic_and_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from bottlefit.splitbench import links

    monkeypatch.setattr(links.os, "geteuid", lambda: 1000)
    with links.open_links("auto") as setup:
        assert isinstance(setup, links.LinkSetup) and setup.kind == "analytic"
        assert "need root" in setup.reason and setup.reason in setup.describe()
    with pytest.raises(links.UserError, match="--link-model netns: network namespaces need root"):
        with links.open_links("netns"):
            pass


@pytest.mark.skipif(namespaces_unavailable() is not None, reason="needs root and iproute2")
def test_namespaces_of_a_killed_run_are_removed() -> None:
    import subprocess

    from bottlefit.splitbench.links import remove_stale

    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{PREFIX}-{dead.pid}-0a0b0c-dev"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in remove_stale()
        assert not (NETNS_DIR / name).exists()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_help_names_every_profile(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "split", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0
    assert all(f"{n} (" in out for n in ("3g", "lte", "wifi", "5g")) and "loss 0.5%" in out
