"""The loop's pure steps: how many epochs a (resumed) run has left, and when it needs the teacher."""

from __future__ import annotations

import dataclasses

import pytest

from bottlefit.training import load_config
from bottlefit.training.loop import _epochs_left, _needs_teacher, _Resume


def _resume(stage: int, epoch: int) -> _Resume:
    return _Resume(stage, epoch, {}, {}, {}, None, [], None)


def _stages(s1: int, s2: int, criterion: str = "kd") -> tuple:
    config = load_config(None, {"models.student_model.name": "mini_resnet", "train.stage1.num_epochs": s1,
                                "train.stage2.num_epochs": s2})
    return config.stage1, dataclasses.replace(config.stage2, criterion=criterion)


def test_epochs_left_after_a_resume() -> None:
    s1, s2 = _stages(3, 2)
    assert (_epochs_left(s1, None), _epochs_left(s2, None)) == (3, 2)
    # stage 1 epoch 0 done: epochs 1 and 2 of stage 1 remain, all of stage 2
    assert (_epochs_left(s1, _resume(1, 0)), _epochs_left(s2, _resume(1, 0))) == (2, 2)
    assert (_epochs_left(s1, _resume(1, 2)), _epochs_left(s2, _resume(1, 2))) == (0, 2)
    assert (_epochs_left(s1, _resume(2, 0)), _epochs_left(s2, _resume(2, 0))) == (0, 1)
    assert _epochs_left(s2, _resume(2, 1)) == 0
    # a config with fewer epochs than the saved run completed: nothing left, never negative
    assert _epochs_left(dataclasses.replace(s2, num_epochs=1), _resume(2, 3)) == 0


@pytest.mark.parametrize(
    "resume,criterion,expected",
    [
        (None, "ce", True),  # a fresh run copies the kept tail from the teacher
        ((1, 0), "ce", True),  # stage 1 left: it distills from the teacher
        ((1, 2), "kd", True),  # stage 2 left with knowledge distillation
        ((1, 2), "ce", False),  # stage 2 left with plain cross-entropy
        ((2, 1), "kd", False),  # nothing left
    ],
)
def test_needs_teacher(resume: tuple[int, int] | None, criterion: str, expected: bool) -> None:
    stages = _stages(3, 2, criterion)
    assert _needs_teacher(stages, _resume(*resume) if resume else None) is expected

