"""Stage-1 machinery: which modules run, which outputs are paired, and the GHND loss (docs/training.md).

Both networks are run only as far as the deepest hooked module (the ResNet teacher up to ``layer4``, the
DenseNet teacher through ``features``; the student through ``layer4`` / ``features.denseblock4``). Outputs are
taken with forward hooks on the paired modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bottlefit.errors import UserError


@dataclass(frozen=True)
class HeadDistillSpec:
    """Module paths for generalized head network distillation of one architecture family."""

    family: str
    teacher_run: tuple[str, ...]  # teacher modules run in order (its "graph" in stage 1)
    teacher_hooks: tuple[str, ...]
    student_run: tuple[str, ...]
    student_hooks: tuple[str, ...]  # paired with teacher_hooks, position by position
    student_frozen: tuple[str, ...]  # the kept tail: frozen in stage 1


RESNET = HeadDistillSpec(
    family="resnet",
    teacher_run=("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
    teacher_hooks=("layer2", "layer3", "layer4"),
    student_run=("bottleneck", "layer3", "layer4"),
    student_hooks=("bottleneck", "layer3", "layer4"),
    student_frozen=("layer3", "layer4"),
)

DENSENET = HeadDistillSpec(
    family="densenet",
    teacher_run=("features",),
    teacher_hooks=("features.transition2", "features.transition3", "features.denseblock4"),
    student_run=("features.bottleneck", "features.denseblock3", "features.transition3", "features.denseblock4"),
    student_hooks=("features.bottleneck", "features.transition3", "features.denseblock4"),
    student_frozen=("features.denseblock3", "features.transition3", "features.denseblock4"),
)


def spec_for(student: nn.Module) -> HeadDistillSpec:
    """The family is read from the student's structure, so small variants built the same way get the same
    pairs."""
    names = {n for n, _ in student.named_modules()}
    if "bottleneck" in names and "layer3" in names:
        return RESNET
    if "features.bottleneck" in names:
        return DENSENET
    raise UserError(f"no stage-1 hook pairs are known for {type(student).__name__}: expected a ResNet-style "
                    "(bottleneck, layer3, layer4) or DenseNet-style (features.bottleneck, …) student")


class HookedForward(nn.Module):
    """Runs ``run`` modules of ``model`` in order and returns the outputs of the ``hooks`` modules.

    It holds only the modules it runs, so DistributedDataParallel around it sees exactly the parameters the
    stage-1 graph uses (the student's unused ``fc`` would otherwise stall gradient reduction).
    """

    def __init__(self, model: nn.Module, run: Sequence[str], hooks: Sequence[str]) -> None:
        super().__init__()
        self.steps = nn.ModuleList(model.get_submodule(n) for n in run)
        self.hook_names = tuple(hooks)
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [
            model.get_submodule(n).register_forward_hook(self._make_hook(n)) for n in self.hook_names
        ]

    def _make_hook(self, name: str):  # noqa: ANN202 - torch's hook signature
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._captured[name] = output

        return hook

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._captured = {}
        for step in self.steps:
            x = step(x)
        out = [self._captured[n] for n in self.hook_names]
        self._captured = {}  # drop references so the graph can be freed
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def ghnd_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of summed squared errors over the hook pairs, each weighted 1.0 (MSELoss(reduction='sum'))."""
    sse = nn.MSELoss(reduction="sum")
    total = sse(student_feats[0], teacher_feats[0])
    for s, t in zip(student_feats[1:], teacher_feats[1:], strict=True):
        total = total + sse(s, t)
    return total


def check_pairs(student: HookedForward, teacher: HookedForward, input_shape: tuple[int, ...]) -> None:
    """One dummy forward, so a mismatched pair fails up front with names instead of deep in the loop."""
    was_s, was_t = student.training, teacher.training
    student.eval()
    teacher.eval()
    with torch.no_grad():
        dev = next(student.parameters()).device
        x = torch.zeros(1, *input_shape, device=dev)
        for sn, tn, s, t in zip(student.hook_names, teacher.hook_names, student(x), teacher(x), strict=True):
            if s.shape != t.shape:
                raise UserError(f"stage-1 hook pair {sn} {tuple(s.shape[1:])} vs teacher {tn} "
                                f"{tuple(t.shape[1:])} do not match; the teacher does not fit this student")
    student.train(was_s)
    teacher.train(was_t)
