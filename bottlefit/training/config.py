"""Training configuration: YAML in the authors' layout, defaults = the authors' values (docs/training.md).

Layout (every key optional; unknown keys are refused)::

    models:
      teacher_model: {name: null, weights: null}     # name defaults to the architecture's teacher
      student_model: {name: custom_resnet152, params: {bottleneck_channel: 12}}
    data:
      root: null            # ImageFolder tree with train/ and val/
      batch_size: 64        # per process, as upstream
      val_batch_size: 64
      num_workers: 4
      augment: true         # RandomResizedCrop + flip (upstream); false: the eval transform for training too
    train:
      output_dir: out/train
      seed: 0
      device: auto          # auto | cpu | cuda
      resume: null          # a last.pt written by an earlier run
      stage1: {num_epochs: 10, criterion: ghnd,
               optimizer: {type: Adam, params: {lr: 0.001}},
               scheduler: {type: MultiStepLR, params: {milestones: [5], gamma: 0.1}}}
      stage2: {num_epochs: 10, criterion: kd, frozen_encoder: false, kd: {temperature: 1.0, alpha: 0.5},
               optimizer: {type: SGD, params: {lr: 0.001, momentum: 0.9, weight_decay: 0.0005}},
               scheduler: {type: MultiStepLR, params: {milestones: [5], gamma: 0.1}}}

Relative paths are taken relative to the current directory, as upstream.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bottlefit.errors import UserError

# Keys whose values are free-form dicts (checked where they are used: the registry, torch.optim).
_FREE = {"params"}

DEFAULTS: dict[str, Any] = {
    "models": {
        "teacher_model": {"name": None, "weights": None},
        "student_model": {"name": "custom_resnet152", "params": {}},
    },
    "data": {"root": None, "batch_size": 64, "val_batch_size": 64, "num_workers": 4, "augment": True},
    "train": {
        "output_dir": "out/train",
        "seed": 0,  # upstream has no default seed; a fixed one makes runs and resumes reproducible
        "device": "auto",
        "resume": None,
        "stage1": {
            "num_epochs": 10,
            "criterion": "ghnd",
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
            "scheduler": {"type": "MultiStepLR", "params": {"milestones": [5], "gamma": 0.1}},
        },
        "stage2": {
            "num_epochs": 10,
            "criterion": "kd",
            "frozen_encoder": False,
            "kd": {"temperature": 1.0, "alpha": 0.5},
            "optimizer": {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}},
            "scheduler": {"type": "MultiStepLR", "params": {"milestones": [5], "gamma": 0.1}},
        },
    },
}

OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop")
SCHEDULERS = ("MultiStepLR", "StepLR", "ConstantLR")
CRITERIA = {1: ("ghnd",), 2: ("kd", "ce")}


@dataclass(frozen=True)
class Component:
    """An optimizer or scheduler: a torch class name and its keyword arguments."""

    type: str
    params: dict[str, Any]


@dataclass(frozen=True)
class StageConfig:
    index: int  # 1 or 2
    num_epochs: int
    criterion: str  # ghnd | kd | ce
    optimizer: Component
    scheduler: Component
    frozen_encoder: bool = False
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the hard-label CE term; the KL term gets 1 - alpha (torchdistill KDLoss)


@dataclass(frozen=True)
class TrainConfig:
    student: str
    student_params: dict[str, Any]
    teacher: str | None  # None: the architecture's own teacher
    teacher_weights: Path | None
    data_root: Path | None
    batch_size: int
    val_batch_size: int
    num_workers: int
    augment: bool
    output_dir: Path
    seed: int
    device: str
    resume: Path | None
    stage1: StageConfig
    stage2: StageConfig
    tree: dict[str, Any]  # the merged nested config, plain data (stored in last.pt)
    source: str = "<defaults>"  # the config file, for messages

    @property
    def stages(self) -> tuple[StageConfig, StageConfig]:
        return (self.stage1, self.stage2)


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"


def _merge(base: dict[str, Any], new: Any, where: str, source: str) -> None:
    if not isinstance(new, dict):
        raise UserError(f"{source}: {where or 'the top level'} must be a mapping, got {type(new).__name__}")
    for key, value in new.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in base:
            raise UserError(f"{source}: unknown config key {dotted!r}{_did_you_mean(str(key), sorted(base))}")
        if key in _FREE:
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{source}: {dotted} must be a mapping")
            base[key] = dict(value or {})
        elif isinstance(base[key], dict):
            _merge(base[key], value, dotted, source)
        else:
            base[key] = value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], dict):
            raise UserError(f"override {dotted!r}: unknown config key {'.'.join(parts[: i + 1])!r}"
                            f"{_did_you_mean(part, sorted(node))}")
        if part in _FREE:  # anything goes below a free-form dict
            node[part][".".join(parts[i + 1:])] = value
            return
        node = node[part]
    last = parts[-1]
    if last not in node:
        raise UserError(f"override {dotted!r}: unknown config key{_did_you_mean(last, sorted(node))}")
    if isinstance(node[last], dict) and last not in _FREE:
        raise UserError(f"override {dotted!r}: is a section; set one of its keys ({', '.join(sorted(node[last]))})")
    node[last] = value


def _typed(value: Any, kind: type, key: str, source: str) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {key} must be {kind.__name__}, got {value!r}") from None


def _component(node: dict[str, Any], key: str, allowed: tuple[str, ...], source: str) -> Component:
    kind = node.get("type")
    if kind not in allowed:
        raise UserError(f"{source}: {key}.type {kind!r} is not supported; use one of: {', '.join(allowed)}")
    return Component(str(kind), dict(node.get("params") or {}))


def _stage(tree: dict[str, Any], index: int, source: str) -> StageConfig:
    node = tree["train"][f"stage{index}"]
    key = f"train.stage{index}"
    epochs = _typed(node["num_epochs"], int, f"{key}.num_epochs", source)
    if epochs < 0:
        raise UserError(f"{source}: {key}.num_epochs must be >= 0, got {epochs}")
    criterion = str(node["criterion"]).lower()
    if criterion not in CRITERIA[index]:
        raise UserError(f"{source}: {key}.criterion {criterion!r} is not supported in stage {index}; "
                        f"use one of: {', '.join(CRITERIA[index])}")
    extra: dict[str, Any] = {}
    if index == 2:
        extra["frozen_encoder"] = _typed(node["frozen_encoder"], bool, f"{key}.frozen_encoder", source)
        extra["temperature"] = _typed(node["kd"]["temperature"], float, f"{key}.kd.temperature", source)
        extra["alpha"] = _typed(node["kd"]["alpha"], float, f"{key}.kd.alpha", source)
        if extra["temperature"] <= 0:
            raise UserError(f"{source}: {key}.kd.temperature must be > 0")
    return StageConfig(
        index=index,
        num_epochs=epochs,
        criterion=criterion,
        optimizer=_component(node["optimizer"], f"{key}.optimizer", OPTIMIZERS, source),
        scheduler=_component(node["scheduler"], f"{key}.scheduler", SCHEDULERS, source),
        **extra,
    )


def _path(value: Any) -> Path | None:
    return None if value in (None, "") else Path(str(value))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file (if any), then ``overrides`` (dotted keys, e.g.
    ``{"train.stage1.num_epochs": 2}``; a value of None leaves the key alone)."""
    tree = copy.deepcopy(DEFAULTS)
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"{p}: no such config file; check the --config path")
        try:
            loaded = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{p}: not valid YAML ({first[:160]})") from None
        if loaded is not None:
            _merge(tree, loaded, "", source)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    d, t, m = tree["data"], tree["train"], tree["models"]
    student = m["student_model"]["name"]
    if not student:
        raise UserError(f"{source}: models.student_model.name is empty; name a BottleFit architecture")
    batch = _typed(d["batch_size"], int, "data.batch_size", source)
    val_batch = _typed(d["val_batch_size"], int, "data.val_batch_size", source)
    if batch < 1 or val_batch < 1:
        raise UserError(f"{source}: data.batch_size and data.val_batch_size must be >= 1")
    device = str(t["device"])
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"{source}: train.device {device!r} is not one of auto, cpu, cuda")
    return TrainConfig(
        student=str(student),
        student_params=dict(m["student_model"]["params"] or {}),
        teacher=m["teacher_model"]["name"] or None,
        teacher_weights=_path(m["teacher_model"]["weights"]),
        data_root=_path(d["root"]),
        batch_size=batch,
        val_batch_size=val_batch,
        num_workers=_typed(d["num_workers"], int, "data.num_workers", source),
        augment=_typed(d["augment"], bool, "data.augment", source),
        output_dir=Path(str(t["output_dir"])),
        seed=_typed(t["seed"], int, "train.seed", source),
        device=device,
        resume=_path(t["resume"]),
        stage1=_stage(tree, 1, source),
        stage2=_stage(tree, 2, source),
        tree=tree,
        source=source,
    )
