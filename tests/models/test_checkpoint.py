"""Checkpoint I/O: every format users bring, and every way a file can be wrong (exit 2, one line)."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bottlefit.cli import main
from bottlefit.errors import UserError
from bottlefit.models import checkpoint
from bottlefit.models.checkpoint import save, untrained
from tests.helpers import authors_dict


@pytest.mark.slow
def test_authors_torchdistill_format_loads_strict(authors_r152: Path, r152) -> None:
    lm = checkpoint.load(authors_r152)
    assert lm.source == "torchdistill"
    assert lm.card.arch == "custom_resnet152"
    assert lm.card.params["bottleneck_channel"] == 12 and lm.card.params["bottleneck_ver"] == "2"
    assert lm.meta["best_value"] == pytest.approx(77.1)
    for k, v in r152.model.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v), k


@pytest.mark.slow
def test_plain_torch_load_refuses_authors_file_but_we_do_not(authors_r152: Path) -> None:
    # The reason this module exists: the argparse.Namespace in 'args' (docs/checkpoints.md).
    with pytest.raises(pickle.UnpicklingError, match="Namespace"):
        torch.load(authors_r152, weights_only=True)


@pytest.mark.slow
def test_sc2bench_and_bare_state_dict(tmp_path: Path, d169) -> None:
    sd = d169.model.state_dict()
    sc2 = {k.replace("features.bottleneck.", "bottleneck_layer."): v for k, v in sd.items()}
    torch.save({"model": sc2, "best_value": 75.0}, tmp_path / "sc2.pt")
    lm = checkpoint.load(tmp_path / "sc2.pt")
    assert (lm.source, lm.card.arch, lm.card.params["bottleneck_channel"]) == ("sc2bench", "custom_densenet169", 12)
    torch.save(sd, tmp_path / "bare.pt")
    lm = checkpoint.load(tmp_path / "bare.pt")
    assert (lm.source, lm.card.arch) == ("state_dict", "custom_densenet169")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(lm.model(x), d169.model(x))


def test_our_format_round_trip_is_weights_only(tmp_path: Path, d169) -> None:
    path = checkpoint.save(tmp_path / "ours.pt", d169.model, d169.card, best_value=70.5, epoch=3)
    raw = torch.load(path, weights_only=True)  # no allow-list needed: nothing but tensors and plain data
    assert raw["format"] == "bottlefit" and raw["card"]["arch"] == "custom_densenet169"
    lm = checkpoint.load(path)
    assert lm.source == "bottlefit" and lm.meta == {"best_value": 70.5, "epoch": 3}
    assert lm.card.bottleneck == d169.card.bottleneck
    assert not list(tmp_path.glob("*.tmp"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/bottlefit-pwned",))


def _write_bad(tmp_path: Path, kind: str, d169) -> Path:
    p = tmp_path / f"{kind}.pt"
    if kind == "random":
        p.write_bytes(np.random.default_rng(7).bytes(4096))
    elif kind == "text":
        p.write_text("model: resnet\n")
    elif kind == "truncated":
        torch.save(d169.model.state_dict(), p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])
    elif kind == "evil":
        torch.save({"model": d169.model.state_dict(), "payload": _Evil()}, p)
    elif kind == "nan":
        sd = dict(d169.model.state_dict())
        sd["classifier.bias"] = sd["classifier.bias"].clone()
        sd["classifier.bias"][3] = float("nan")
        torch.save(sd, p)
    elif kind == "missing":
        sd = dict(d169.model.state_dict())
        del sd["classifier.weight"]
        torch.save(sd, p)
    elif kind == "extra":
        sd = dict(d169.model.state_dict())
        sd["head.extra.weight"] = torch.zeros(3)
        torch.save(sd, p)
    return p


@pytest.mark.parametrize("kind,message", [
    ("random", "not a readable PyTorch checkpoint"),
    ("text", "not a readable PyTorch checkpoint"),
    ("truncated", "not a readable PyTorch checkpoint"),
    ("evil", "refused"),
    ("nan", "NaN or Inf"),
    ("missing", "1 missing (first: classifier.weight)"),
    ("extra", "1 unexpected (first: head.extra.weight)"),
])
def test_bad_files_get_one_line_and_exit_2(tmp_path: Path, d169, capsys, kind: str, message: str) -> None:
    marker = Path("/tmp/bottlefit-pwned")
    marker.unlink(missing_ok=True)
    p = _write_bad(tmp_path, kind, d169)
    with pytest.raises(UserError, match=None) as e:
        checkpoint.load(p, arch="custom_densenet169")
    assert message in str(e.value) and str(p) in str(e.value)
    assert main(["inspect", str(p), "--arch", "custom_densenet169"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bottlefit: error: ") and "Traceback" not in err
    assert not marker.exists(), "a checkpoint executed code on load"


def test_missing_file_and_directory(tmp_path: Path, capsys) -> None:
    assert main(["inspect", str(tmp_path / "nope.pt")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_other_architecture_or_channels_than_asked(authors_r152: Path) -> None:
    with pytest.raises(UserError, match="holds a custom_resnet152 checkpoint, but --arch custom_densenet169"):
        checkpoint.load(authors_r152, arch="custom_densenet169")
    with pytest.raises(UserError, match="bottleneck_channel=12, but bottleneck_channel=6 was asked"):
        checkpoint.load(authors_r152, params={"bottleneck_channel": 6})


def test_bare_file_with_wrong_channel_count_names_the_key(tmp_path: Path, d169) -> None:
    torch.save(d169.model.state_dict(), tmp_path / "b.pt")
    # a bare state_dict says its channel count through its shapes; asking for another one is refused
    with pytest.raises(UserError, match="bottleneck_channel"):
        checkpoint.load(tmp_path / "b.pt", params={"bottleneck_channel": 6})


def test_truncated_zip_is_not_a_zip(tmp_path: Path, d169) -> None:
    p = _write_bad(tmp_path, "truncated", d169)
    assert not zipfile.is_zipfile(p)


@pytest.mark.slow
def test_authors_dict_of_densenet_with_bq_config(tmp_path: Path, d169) -> None:
    params = {"bottleneck_channel": 12, "bottleneck_idx": 7,
              "compressor": {"name": "Quantizer", "params": {"num_bits": 8}},
              "decompressor": {"name": "Dequantizer", "params": {"num_bits": 8}}}
    torch.save(authors_dict(d169, "custom_densenet169", params), tmp_path / "bq.pt")
    lm = checkpoint.load(tmp_path / "bq.pt")
    assert lm.card.bottleneck.quantizer == "bq8"


def test_damaged_checkpoints_never_give_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Untrusted bytes: random blobs, and a real checkpoint cut short or with flipped bytes, each get the one-line
    error and exit 2 (seeded, so the same files every run)."""
    good = tmp_path / "good.pt"
    lm = untrained("mini_resnet", {"bottleneck_channel": 2})
    save(good, lm.model, lm.card)
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(int(n)) for n in rng.integers(1, 5000, 12)]
    blobs += [data[: int(n)] for n in rng.integers(1, len(data) - 1, 6)]
    for _ in range(6):
        flipped = bytearray(data)
        for i in rng.integers(0, len(data), 8):
            flipped[i] ^= 0xFF
        blobs.append(bytes(flipped))
    for k, blob in enumerate(blobs):
        p = tmp_path / f"bad{k}.pt"
        p.write_bytes(blob)
        rc = main(["inspect", str(p)])
        err = capsys.readouterr().err.strip()
        if rc == 0:  # a flipped byte inside a tensor's data still loads: it is a valid checkpoint
            continue
        assert rc == 2 and len(err.splitlines()) == 1 and str(p) in err, (k, err)


@pytest.mark.parametrize("data,reason", [
    (b"\x80\x02(.", "its pickled data is malformed or cut short: the file is damaged, truncated or not made by "
                    "torch.save"),  # the unpickler said "pop from empty list"
    (b"\x80\x02", "its pickled data is malformed or cut short"),  # an EOFError without a message
    (b"", "the file is empty"),
])
def test_unreadable_checkpoint_says_what_to_do(tmp_path: Path, capsys, data: bytes, reason: str) -> None:
    p = tmp_path / "model.pt"
    p.write_bytes(data)
    assert main(["inspect", str(p), "--arch", "mini_resnet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bottlefit: error: {p}: not a readable PyTorch checkpoint ({reason}") and err.endswith(
        "); copy or download it again and compare its checksum, or re-save it with "
        "torch.save(model.state_dict(), PATH)\n")
    assert "pop from empty list" not in err and err.count("\n") == 1


@pytest.mark.parametrize("version,message", [
    (99, "checkpoint format_version 99 is newer than this bottlefit reads (up to 1); upgrade bottlefit"),
    ("1", "format_version '1' is not a bottlefit checkpoint version"),
    (None, "format_version None is not a bottlefit checkpoint version"),
])
def test_format_version_newer_than_known_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   version: object, message: str) -> None:
    lm = untrained("mini_resnet", {"bottleneck_channel": 4})
    path = save(tmp_path / "future.pt", lm.model, lm.card)
    obj = torch.load(path, weights_only=True)
    obj["format_version"] = version
    torch.save(obj, path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bottlefit: error: {path}: {message}") and err.count("\n") == 1
