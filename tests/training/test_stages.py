"""Both stages on the mini variant and 3,000 offline MNIST digits: numbers, not just "it runs"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bottlefit.models import checkpoint, registry
from bottlefit.training import DataSplits, evaluate, load_config, mnist_splits, train, train_teacher
from bottlefit.training.distill import ghnd_loss
from bottlefit.training.stages import kd_loss

ARCH = "mini_resnet"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataSplits, Path]:
    # One thread: on a shared 2-core box, OpenMP threads spinning against other jobs are slower than one.
    torch.set_num_threads(1)
    _, card = registry.build(ARCH)
    data = mnist_splits(card, n_train=2500, n_val=1000)
    weights, top1 = train_teacher(ARCH, data, tmp_path_factory.mktemp("teacher") / "teacher.pt", epochs=3,
                                  log=lambda s: None)
    assert top1 > 90.0  # a teacher worth distilling from
    return data, weights


def _config(weights: Path, out: Path, **over: object) -> object:
    return load_config(None, {"models.student_model.name": ARCH, "models.teacher_model.weights": str(weights),
                              "train.output_dir": str(out), **over})


def _history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_losses_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(4, 3, 2, 2, generator=g) for _ in range(3)]
    t = [torch.randn(4, 3, 2, 2, generator=g) for _ in range(3)]
    expected = sum(((a - b) ** 2).sum().item() for a, b in zip(s, t, strict=True))
    assert ghnd_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    logits_s, logits_t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    y = torch.tensor([0])
    ps = torch.softmax(logits_s, 1)
    pt = torch.softmax(logits_t, 1)
    ce = -torch.log(ps[0, 0])
    kl = (pt * (pt.log() - ps.log())).sum()
    assert kd_loss(logits_s, logits_t, y, 1.0, 0.5).item() == pytest.approx((0.5 * ce + 0.5 * kl).item(), rel=1e-6)
    # T=2: the soft term is scaled by T^2 and uses softened distributions
    ps2, pt2 = torch.softmax(logits_s / 2, 1), torch.softmax(logits_t / 2, 1)
    kl2 = (pt2 * (pt2.log() - ps2.log())).sum()
    assert kd_loss(logits_s, logits_t, y, 2.0, 0.25).item() == pytest.approx((0.25 * ce + 0.75 * 4 * kl2).item(),
                                                                           rel=1e-6)


PLAN = {"train.stage1.num_epochs": 2, "train.stage2.num_epochs": 2}


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Stage 1 and stage 2 (KD) uninterrupted: (output dir, best.pt)."""
    data, weights = setup
    out = tmp_path_factory.mktemp("run")
    return out, train(_config(weights, out, **PLAN), log=print, data=data)


@pytest.mark.slow
def test_stage1_reduces_distillation_loss_and_stage2_improves_accuracy(setup, full_run) -> None:
    data, _ = setup
    out, best = full_run
    hist = _history(out)
    s1 = [h for h in hist if h["stage"] == 1]
    s2 = [h for h in hist if h["stage"] == 2]
    assert [h["epoch"] for h in s1] == [0, 1] and [h["epoch"] for h in s2] == [0, 1]
    print("stage1 loss", [round(h["loss"], 1) for h in s1], "top1", [h["top1"] for h in s1])
    print("stage2 loss", [round(h["loss"], 4) for h in s2], "top1", [h["top1"] for h in s2])
    assert s1[-1]["loss"] < 0.8 * s1[0]["loss"]  # the summed squared errors fall
    assert max(h["top1"] for h in s2) > s1[-1]["top1"] + 0.5  # stage 2 trains the classifier path
    assert s2[-1]["loss"] < s2[0]["loss"]
    loaded = checkpoint.load(best)
    assert loaded.meta["best_value"] == max(h["top1"] for h in hist)
    # the stored value is exactly a fresh evaluation of the stored weights
    assert evaluate(loaded.model, data.val).top1 == loaded.meta["best_value"]
    # last.pt is read back with weights_only (tensors and plain data only)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["train_state"]["stage"] == 2 and state["train_state"]["epoch"] == 1
    assert state["train_state"]["scheduler"]["last_epoch"] == 2


@pytest.mark.slow
def test_stage1_freezes_tail_and_fe_freezes_encoder_while_bn_stats_update(setup, tmp_path: Path) -> None:
    data, weights = setup
    out = tmp_path / "fe"
    train(_config(weights, out, **{"train.stage1.num_epochs": 1, "train.stage2.num_epochs": 0}), data=data)
    after1 = torch.load(out / "last.pt", weights_only=True)["model"]
    teacher = torch.load(weights, weights_only=True)
    # stage 1: the kept tail's parameters are the teacher's, bit for bit; its BN statistics moved on
    assert torch.equal(after1["layer3.0.conv1.weight"], teacher["layer3.0.conv1.weight"])
    assert torch.equal(after1["layer4.0.bn2.weight"], teacher["layer4.0.bn2.weight"])
    assert not torch.equal(after1["layer3.0.bn1.running_mean"], teacher["layer3.0.bn1.running_mean"])

    train(_config(weights, out, **{"train.stage1.num_epochs": 1, "train.stage2.num_epochs": 2,
                                   "train.stage2.frozen_encoder": True, "train.stage2.criterion": "ce",
                                   "train.resume": str(out / "last.pt")}), data=data)
    after2 = torch.load(out / "last.pt", weights_only=True)["model"]
    model, _ = registry.build(ARCH)
    enc_params = [f"bottleneck.encoder.{n}" for n, _ in model.bottleneck.encoder.named_parameters()]
    enc_buffers = [f"bottleneck.encoder.{n}" for n, _ in model.bottleneck.encoder.named_buffers()]
    assert len(enc_params) == 6  # conv, BN(w, b), BN(w, b), conv
    for k in enc_params:
        assert torch.equal(after1[k], after2[k]), k
    changed = [k for k in enc_buffers if not torch.equal(after1[k], after2[k])]
    assert "bottleneck.encoder.1.running_mean" in changed and "bottleneck.encoder.4.running_var" in changed
    assert not torch.equal(after1["bottleneck.decoder.2.weight"], after2["bottleneck.decoder.2.weight"])
    assert not torch.equal(after1["layer3.0.conv1.weight"], after2["layer3.0.conv1.weight"])  # unfrozen again


@pytest.mark.slow
def test_resume_continues_from_saved_epoch(setup, full_run, tmp_path: Path) -> None:
    data, weights = setup
    straight = _history(full_run[0])

    out = tmp_path / "resumed"
    train(_config(weights, out, **{"train.stage1.num_epochs": 1, "train.stage2.num_epochs": 0}), data=data)
    lines: list[str] = []
    train(_config(weights, out, **PLAN, **{"train.resume": str(out / "last.pt")}), log=lines.append, data=data)
    assert lines[0].startswith(f"resuming from {out / 'last.pt'}: stage 1, epoch 1 done")
    assert lines[1].startswith("stage 1 epoch 2/2") and lines[2].startswith("stage 2 epoch 1/2")
    resumed = _history(out)
    assert [(h["stage"], h["epoch"]) for h in resumed] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for a, b in zip(straight, resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert abs(b["correct"] - a["correct"]) <= 2
    assert checkpoint.load(out / "best.pt").meta["history"][-1]["stage"] == 2
