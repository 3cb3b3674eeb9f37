"""Shared fixtures: real architectures, checkpoints written in the formats users bring."""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import pytest
import torch

from bottlefit.models.checkpoint import LoadedModel, untrained


def authors_dict(lm: LoadedModel, arch: str, params: dict) -> dict:
    """A checkpoint laid out as torchdistill 0.3.2's save_ckpt writes it (shared/BOTTLEFIT.md §2.1)."""
    trainable = [p for p in lm.model.parameters()][:2]
    opt = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[5], gamma=0.1)
    sched_state = sched.state_dict()
    sched_state["milestones"] = collections.Counter({5: 1})
    return {
        "model": lm.model.state_dict(),
        "optimizer": opt.state_dict(),
        "best_value": 77.1,
        "lr_scheduler": sched_state,
        "config": {
            "models": {"student_model": {"name": arch, "params": {**params, "pretrained": True}, "ckpt": "x.pt"}},
            "train": {"stage1": {"num_epochs": 10}},
        },
        "args": argparse.Namespace(config="x.yaml", device="cuda", log=None, start_epoch=0, seed=None,
                                   test_only=False, student_only=False, log_config=False, world_size=1,
                                   dist_url="env://", adjust_lr=False),
    }


@pytest.fixture(scope="session")
def r152() -> LoadedModel:
    return untrained("custom_resnet152", {"bottleneck_channel": 12, "bottleneck_ver": "2"}, seed=0)


@pytest.fixture(scope="session")
def authors_r152(tmp_path_factory: pytest.TempPathFactory, r152: LoadedModel) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ilsvrc2012-custom_resnet152_from_resnet152-12ch.pt"
    torch.save(authors_dict(r152, "custom_resnet152", {"bottleneck_channel": 12, "bottleneck_idx": 7,
                                                      "bottleneck_ver": "2"}), path)
    return path


@pytest.fixture(scope="session")
def d169() -> LoadedModel:
    return untrained("custom_densenet169", {"bottleneck_channel": 12}, seed=0)
