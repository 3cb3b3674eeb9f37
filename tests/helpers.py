"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
from pathlib import Path

import torch

from bottlefit.models.checkpoint import LoadedModel


@functools.cache
def _untrained(arch: str, params_json: str) -> LoadedModel:
    from bottlefit.models.checkpoint import untrained

    return untrained(arch, json.loads(params_json), seed=0)


def shared_untrained(arch: str, params: dict) -> LoadedModel:
    """``untrained(arch, params, seed=0)``, built once per session (a full-size one costs seconds of CPU): the
    conftest fixtures and tests.targets.rpi take their models here. Callers must not modify it (copy first)."""
    return _untrained(arch, json.dumps(params, sort_keys=True))


def clone_export(src: Path, dst: Path) -> Path:
    """A private copy of an export dir (its codec/ and triton/ folders too); files over 10 MB (the 240 MB tail and
    its Triton copy) are hard-linked (never written by the tests)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_dir():
            clone_export(f, dst / f.name)
        elif f.stat().st_size > 10 << 20:
            os.link(f, dst / f.name)
        else:
            shutil.copy2(f, dst / f.name)
    return dst


def authors_dict(lm: LoadedModel, arch: str, params: dict) -> dict:
    """A checkpoint laid out as torchdistill 0.3.2's save_ckpt writes it (docs/checkpoints.md)."""
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
