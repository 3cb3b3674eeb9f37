"""The two BottleFit stages (docs/training.md): teacher, freezing, optimizers and per-batch losses.

"Frozen" means ``requires_grad=False`` only: the student stays in train mode, so BatchNorm running statistics
of frozen modules keep updating, and gradients still flow through them to the modules before.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bottlefit.errors import UserError
from bottlefit.models import registry
from bottlefit.models.checkpoint import key_mismatch
from bottlefit.training.config import Component, StageConfig
from bottlefit.training.distill import HeadDistillSpec, HookedForward, check_pairs, ghnd_loss, spec_for

# torchvision's released DenseNet files use the old "norm.1" layer names; its own loader renames them.
_DENSE_OLD = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def build_teacher(name: str, num_classes: int) -> nn.Module:
    """A randomly initialized teacher: the small ones from ``bottlefit.models.small``, else torchvision's."""
    from bottlefit.models.small import TEACHERS

    if name in TEACHERS:
        return TEACHERS[name](num_classes=num_classes)
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError:
        raise UserError(f"unknown teacher model {name!r}; set models.teacher_model.name to a torchvision "
                        "classifier name") from None


def load_teacher_weights(teacher: nn.Module, path: Path) -> None:
    """A torchvision state_dict (or a dict with a 'model' state_dict), read with weights_only; strict keys."""
    hint = "pass --teacher-weights with the teacher's torchvision state_dict"
    if not path.is_file():
        raise UserError(f"{path}: no such teacher weights file; {hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable weights-only PyTorch file ({first[:160]}); {hint}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state_dict (expected a mapping of names to tensors); {hint}")
    sd = {_DENSE_OLD.sub(r"\1\2", k): v for k, v in obj.items()}
    problem = key_mismatch(teacher.state_dict(), sd)
    if problem:
        raise UserError(f"{path}: does not fit the teacher {type(teacher).__name__}: {problem}; {hint}")
    teacher.load_state_dict(sd, strict=True)


def prepare_teacher(arch_name: str, teacher_name: str | None, num_classes: int, weights: Path | None,
                    source: str) -> nn.Module:
    if weights is None:
        raise UserError(f"{source}: the teacher needs weights: pass --teacher-weights PATH "
                        "(models.teacher_model.weights), a torchvision state_dict")
    name = teacher_name or registry.get(arch_name).teacher
    teacher = build_teacher(name, num_classes)
    load_teacher_weights(teacher, weights)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def init_student_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy every tensor whose name and shape match (the kept tail: layer3, layer4, fc / the dense blocks,
    norm5, classifier), as the authors start those from the ImageNet weights. Returns how many were copied."""
    t_sd = teacher.state_dict()
    s_sd = student.state_dict()
    copied = {k: t_sd[k].clone() for k, v in s_sd.items() if k in t_sd and t_sd[k].shape == v.shape}
    student.load_state_dict(copied, strict=False)
    return len(copied)


def set_frozen(model: nn.Module, frozen: Iterable[str]) -> None:
    """Unfreeze everything, then freeze the named modules' parameters (buffers are untouched)."""
    for p in model.parameters():
        p.requires_grad_(True)
    for name in frozen:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(False)


def frozen_modules(stage: StageConfig, student: nn.Module, encoder_path: str) -> list[str]:
    if stage.index == 1:
        return list(spec_for(student).student_frozen)
    return [encoder_path] if stage.frozen_encoder else []


def make_optimizer(model: nn.Module, comp: Component, key: str, source: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return getattr(torch.optim, comp.type)(params, **comp.params)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {key}.params {comp.params} rejected by torch.optim.{comp.type}: {e}") from None


def make_scheduler(opt: torch.optim.Optimizer, comp: Component, key: str, source: str) -> Any:
    try:
        return getattr(torch.optim.lr_scheduler, comp.type)(opt, **comp.params)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {key}.params {comp.params} rejected by {comp.type}: {e}") from None


class Stage1:
    """GHND: the student's bottleneck learns to reproduce the teacher's layer2/3/4 outputs."""

    def __init__(self, student: nn.Module, teacher: nn.Module, input_shape: tuple[int, ...]) -> None:
        self.spec: HeadDistillSpec = spec_for(student)
        self.student_graph = HookedForward(student, self.spec.student_run, self.spec.student_hooks)
        self.teacher_graph = HookedForward(teacher, self.spec.teacher_run, self.spec.teacher_hooks)
        check_pairs(self.student_graph, self.teacher_graph, input_shape)

    def trainable(self) -> nn.Module:
        """What DDP wraps: the stage-1 student graph only."""
        return self.student_graph

    def loss(self, graph: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher_graph(x)
        return ghnd_loss(graph(x), t)

    def close(self) -> None:
        self.student_graph.remove()
        self.teacher_graph.remove()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float, alpha: float) -> torch.Tensor:
    """torchdistill KDLoss: alpha * CE(s, y) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean."""
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction="batchmean")
    hard = F.cross_entropy(student_logits, targets)
    return alpha * hard + (1.0 - alpha) * temperature**2 * soft


class Stage2:
    """KD from the full teacher, or plain cross-entropy; optionally with the encoder frozen (FE)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, stage: StageConfig) -> None:
        self.student = student
        self.teacher = teacher
        self.stage = stage
        if stage.criterion == "kd" and teacher is None:
            raise ValueError("KD needs a teacher")

    def trainable(self) -> nn.Module:
        return self.student

    def loss(self, graph: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = graph(x)
        if self.stage.criterion == "ce":
            return F.cross_entropy(logits, y)
        assert self.teacher is not None
        with torch.no_grad():
            t = self.teacher(x)
        return kd_loss(logits, t, y, self.stage.temperature, self.stage.alpha)

    def close(self) -> None:
        pass
