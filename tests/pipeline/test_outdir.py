"""Where an export writes: stale tmp dirs of dead exports are removed, signals clean up, a failed attempt goes beside
the last passing export, the swap is atomic for readers under concurrent writers, modes follow the umask, and the
manifest names the checkpoint by what it is, not where it lay."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bottlefit.cli import main
from bottlefit.exporter.manifest import sha256_file
from bottlefit.models.checkpoint import save, untrained
from tests.helpers import clone_export

MINI = ["--untrained", "--arch", "mini_resnet", "--target", "onnx"]
ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _start_export(out: Path) -> subprocess.Popen[str]:
    """`bottlefit export` in a child with default SIGTERM/SIGHUP dispositions (whatever this process inherited)."""
    code = ("import signal, sys\n"
            "signal.signal(signal.SIGTERM, signal.SIG_DFL); signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
            "from bottlefit.cli import main\n"
            f"sys.exit(main(['export', *{MINI!r}, '--out', {str(out)!r}, '--quiet']))\n")
    return subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_attempt(out: Path, proc: subprocess.Popen[str]) -> Path:
    """The child's OUT/.onnx.tmp-* once it exists (the export is past loading and building has begun)."""
    deadline = time.monotonic() + 600  # a guard against a hang, not a measurement
    while time.monotonic() < deadline:
        found = list(out.glob(".onnx.tmp-*")) if out.is_dir() else []
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the export ended (rc {proc.returncode}) before its tmp dir was seen: {proc.stderr.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no tmp dir appeared")


def test_sigkilled_exports_tmp_dir_is_removed_by_the_next_export_and_a_live_one_kept(tmp_path: Path) -> None:
    from bottlefit.files import lock_dir

    out = tmp_path / "out"
    proc = _start_export(out)
    dead = _wait_for_attempt(out, proc)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert dead.is_dir()  # SIGKILL cannot be caught: the attempt's dir stays until the next export
    live = out / ".onnx.tmp-live"  # a concurrent export's, locked by its (this) process: never touched
    live.mkdir()
    fd = lock_dir(live)
    assert fd is not None
    try:
        assert main(["export", *MINI, "--out", str(out), "--quiet"]) == 0
    finally:
        os.close(fd)
    assert not dead.exists()
    assert sorted(p.name for p in out.iterdir()) == [".onnx.tmp-live", "onnx"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGHUP, marks=pytest.mark.slow)])
def test_sigterm_and_sighup_remove_the_attempt_and_the_out_it_created(tmp_path: Path, sig: int) -> None:
    out = tmp_path / "made" / "out"
    proc = _start_export(out)
    _wait_for_attempt(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"bottlefit: terminated by {signal.Signals(sig).name}"
    assert "Traceback" not in err
    assert not (tmp_path / "made").exists()  # the attempt, OUT and its parent: all made by this export, all gone


def test_failed_export_removes_the_out_dir_it_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a npz")
    # --images is read at parity, after the attempt's dir was made in OUT
    assert main(["export", *MINI, "--out", str(tmp_path / "new" / "out"), "--images", str(bad), "--quiet"]) == 2
    assert "bad.npz" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]


def test_failing_export_keeps_the_passing_one_and_writes_beside_it(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from bottlefit.exporter.manifest import target_dirs

    out = tmp_path / "out"
    good, failed = out / "onnx", out / "onnx.failed"
    assert main(["export", *MINI, "--out", str(out), "--quiet"]) == 0
    kept = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}
    capsys.readouterr()
    fail = ["--tolerance", "logits.max_abs_error=-1"]  # no error can pass: parity fails, exit 1
    assert main(["export", *MINI, "--out", str(out), *fail]) == 1
    cap = capsys.readouterr()
    assert f"parity FAILED: kept the last passing export in {good}; this attempt is in {failed}" in cap.err
    assert cap.out.strip().splitlines()[-1] == f"FAIL: {failed}"
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == kept
    assert json.loads((failed / "report.json").read_text())["passed"] is False
    assert target_dirs(out) == [good]  # `verify OUT` and `serve OUT` see the passing export only
    assert sorted(p.name for p in out.iterdir()) == ["onnx", "onnx.failed"]

    assert main(["export", *MINI, "--out", str(out), *fail, "--replace-failed", "--quiet"]) == 1
    assert json.loads((good / "report.json").read_text())["passed"] is False
    assert sorted(p.name for p in out.iterdir()) == ["onnx"]


_WRITER = """
import json, sys
from pathlib import Path
from bottlefit.files import atomic_write_text, make_private_dir, replace_dir
out, n, tag = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for i in range(n):
    d = make_private_dir(out, ".t.tmp-")
    (d / "artifact.bin").write_bytes(bytes(8192))
    atomic_write_text(d / "manifest.json", json.dumps({"writer": tag, "i": i, "artifacts": ["artifact.bin"]}))
    replace_dir(d, out / "t")
"""


def test_concurrent_replacements_are_atomic_for_readers(tmp_path: Path) -> None:
    """Two processes replace OUT/t 200 times each while this one reads OUT/t/manifest.json: no writer fails, every
    read finds a whole manifest, nothing is left but OUT/t."""
    swaps = 200
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(swaps), tag], env=_env(),
                                stderr=subprocess.PIPE, text=True) for tag in ("a", "b")]
    reads, misses, seen = 0, [], set()
    while any(w.poll() is None for w in writers):
        try:
            m = json.loads((tmp_path / "t" / "manifest.json").read_text())
        except FileNotFoundError as e:
            if seen:  # before the first publication there is nothing to read
                misses.append(repr(e))
            continue
        except json.JSONDecodeError as e:
            misses.append(repr(e))
            continue
        reads += 1
        seen.add(m["writer"])
        assert m["artifacts"] == ["artifact.bin"]
    errs = [w.stderr.read() for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errs
    assert misses == []
    assert reads > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    final = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert final["i"] == swaps - 1


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """One checkpoint, copied into two folders, each exported (onnx) under another umask: {umask: OUT}."""
    root = tmp_path_factory.mktemp("two-folders")
    lm = untrained("mini_resnet", {"bottleneck_channel": 4})
    save(root / "a" / "best.pt", lm.model, lm.card)
    (root / "b").mkdir()
    shutil.copy(root / "a" / "best.pt", root / "b" / "best.pt")
    outs = {}
    for mask, folder in ((0o022, "a"), (0o077, "b")):
        old = os.umask(mask)
        try:
            rc = main(["export", str(root / folder / "best.pt"), "--target", "onnx", "--out",
                       str(root / folder / "out"), "--quiet"])
        finally:
            os.umask(old)
        assert rc == 0
        outs[mask] = root / folder / "out"
    return outs


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_path_written_follows_the_umask(two_folders: dict[int, Path], mask: int) -> None:
    out = two_folders[mask]
    paths = [out, *out.rglob("*")]
    dirs = {str(p.relative_to(out)) for p in paths if p.is_dir()}
    assert {".", "onnx", "onnx/triton"} <= dirs and len(paths) >= 9
    for p in paths:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (str(p.relative_to(out)), oct(p.stat().st_mode))


def test_manifest_names_the_checkpoint_not_its_folder(two_folders: dict[int, Path]) -> None:
    a, b = (two_folders[m] / "onnx" / "manifest.json" for m in (0o022, 0o077))
    assert a.read_bytes() == b.read_bytes()
    src = json.loads(a.read_text())["source"]
    ckpt = two_folders[0o022].parent / "best.pt"
    assert src["name"] == "best.pt" and src["size"] == ckpt.stat().st_size and src["sha256"] == sha256_file(ckpt)
    assert "path" not in src and str(ckpt.parent) not in a.read_text()


def test_verify_finds_the_checkpoint_or_asks_for_it(two_folders: dict[int, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    d = clone_export(two_folders[0o022] / "onnx", tmp_path / "onnx")
    monkeypatch.setenv("BOTTLEFIT_CACHE", str(tmp_path / "fresh-cache"))  # a machine that never saw it
    assert main(["verify", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "best.pt (sha256 " in err and "pass --checkpoint PATH" in err
    assert main(["verify", str(d), "--checkpoint", str(two_folders[0o077].parent / "best.pt")]) == 0
