"""Config defaults and overrides, and every bad input the issue names: each a UserError naming key or file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from bottlefit.errors import UserError
from bottlefit.models import checkpoint, registry
from bottlefit.models.small import build_teacher
from bottlefit.training import DataSplits, load_config, train


def test_defaults_are_the_authors_values() -> None:
    c = load_config(None, {})
    assert (c.student, c.batch_size, c.val_batch_size) == ("custom_resnet152", 64, 64)
    assert (c.stage1.num_epochs, c.stage1.criterion, c.stage1.optimizer.type) == (10, "ghnd", "Adam")
    assert c.stage1.optimizer.params == {"lr": 1e-3}
    assert c.stage1.scheduler.params == {"milestones": [5], "gamma": 0.1}
    assert (c.stage2.num_epochs, c.stage2.criterion, c.stage2.optimizer.type) == (10, "kd", "SGD")
    assert c.stage2.optimizer.params == {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}
    assert (c.stage2.temperature, c.stage2.alpha, c.stage2.frozen_encoder) == (1.0, 0.5, False)


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("models:\n  student_model: {name: mini_resnet, params: {bottleneck_channel: 2}}\n"
                 "train:\n  stage2: {criterion: ce, frozen_encoder: true, optimizer: {params: {lr: 0.01}}}\n")
    c = load_config(f, {"train.stage2.optimizer.params.lr": 0.05, "train.stage1.num_epochs": "3",
                        "data.batch_size": None})
    assert (c.student, c.student_params) == ("mini_resnet", {"bottleneck_channel": 2})
    assert (c.stage2.criterion, c.stage2.frozen_encoder, c.stage2.optimizer.params) == ("ce", True, {"lr": 0.05})
    assert c.stage2.optimizer.type == "SGD" and c.stage1.num_epochs == 3 and c.batch_size == 64


def test_unknown_config_key_names_key_and_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stage1:\n    num_epoch: 3\n")
    with pytest.raises(UserError, match=r"bad\.yaml: unknown config key 'train\.stage1\.num_epoch'; "
                                        r"did you mean 'num_epochs'"):
        load_config(f, {})
    with pytest.raises(UserError, match=r"override 'train\.stage3\.lr': unknown config key 'train\.stage3'"):
        load_config(None, {"train.stage3.lr": 1})
    with pytest.raises(UserError, match=r"train\.stage2\.criterion 'mse'"):
        load_config(None, {"train.stage2.criterion": "mse"})


def _tiny() -> DataSplits:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 10)
    return DataSplits(ds, ds, [str(i) for i in range(10)])


def _mini(tmp_path: Path, **over: object):
    return load_config(None, {"models.student_model.name": "mini_resnet", "train.output_dir": str(tmp_path / "o"),
                              "train.stage1.num_epochs": 1, "train.stage2.num_epochs": 1, **over})


def test_teacher_weights_missing_or_wrong(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="pass --teacher-weights"):
        train(_mini(tmp_path), data=_tiny())
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=rf"{missing}: no such teacher weights file"):
        train(_mini(tmp_path, **{"models.teacher_model.weights": str(missing)}), data=_tiny())
    wrong = tmp_path / "wrong.pt"
    sd = build_teacher(10).state_dict()
    sd["extra.weight"] = sd.pop("fc.weight")
    torch.save(sd, wrong)
    with pytest.raises(UserError, match=rf"{wrong}: does not fit the teacher MiniResNet: 1 missing \(first: "
                                        r"fc\.weight\); 1 unexpected \(first: extra\.weight\)"):
        train(_mini(tmp_path, **{"models.teacher_model.weights": str(wrong)}), data=_tiny())
    shaped = tmp_path / "shaped.pt"
    torch.save(build_teacher(7).state_dict(), shaped)  # 7 classes, the student has 10
    with pytest.raises(UserError, match=rf"{shaped}: .*2 mis-shaped \(first: fc\.weight \(7, 128\)"):
        train(_mini(tmp_path, **{"models.teacher_model.weights": str(shaped)}), data=_tiny())
    pickled = tmp_path / "obj.pt"
    torch.save({"fn": Path("x")}, pickled)
    with pytest.raises(UserError, match=rf"{pickled}: not a readable weights-only PyTorch file"):
        train(_mini(tmp_path, **{"models.teacher_model.weights": str(pickled)}), data=_tiny())


def test_dataset_folder_without_classes(tmp_path: Path) -> None:
    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "val").mkdir()
    with pytest.raises(UserError, match=rf"{tmp_path / 'd' / 'train'}: no classes found"):
        train(_mini(tmp_path, **{"data.root": str(tmp_path / "d")}))
    with pytest.raises(UserError, match=rf"{tmp_path / 'missing'}: no such data folder"):
        train(_mini(tmp_path, **{"data.root": str(tmp_path / "missing")}))


def test_resume_from_another_architecture(tmp_path: Path) -> None:
    model, card = registry.build("mini_resnet", {"bottleneck_channel": 2})
    last = checkpoint.save(tmp_path / "last.pt", model, card, train_state={"stage": 1, "epoch": 0})
    with pytest.raises(UserError, match=rf"{last}: is a mini_resnet checkpoint, but the config trains "
                                        r"custom_resnet152 \(models.student_model.name\)"):
        train(load_config(None, {"train.resume": str(last), "train.output_dir": str(tmp_path / "o")}),
              data=_tiny())
    with pytest.raises(UserError, match=rf"{last}: was trained with bottleneck_channel=2, but the config asks "
                                        r"for bottleneck_channel=4"):
        train(_mini(tmp_path, **{"train.resume": str(last)}), data=_tiny())
