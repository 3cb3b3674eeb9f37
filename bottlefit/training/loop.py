"""The epoch loop over both stages: single process, or one process per device under ``torchrun`` (DDP).

- Rank 0 alone writes checkpoints and logs; every rank computes, and metrics are all-reduced as sums of
  correct/total (and of batch losses), so they equal a single-process evaluation of the same weights.
- After every epoch (both stages) the full student is evaluated; ``best.pt`` keeps the best top-1 over both
  stages, ``last.pt`` the complete training state (weights, optimizer, scheduler, stage, epoch, RNG) as tensors
  and plain data, so ``torch.load(weights_only=True)`` reads it and ``train.resume`` continues from it.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from bottlefit.errors import UserError
from bottlefit.models import checkpoint, registry
from bottlefit.models.card import ModelCard
from bottlefit.training.config import StageConfig, TrainConfig
from bottlefit.training.data import DataSplits, image_folder_splits
from bottlefit.training.stages import (
    Stage1,
    Stage2,
    build_teacher,
    frozen_modules,
    init_student_from_teacher,
    make_optimizer,
    make_scheduler,
    prepare_teacher,
    set_frozen,
)

Log = Callable[[str], Any]
BEST = "best.pt"
LAST = "last.pt"
LOG_FILE = "train_log.jsonl"


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # whether we created the process group (and so must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> DistEnv:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("train.device is cuda, but no CUDA device is available; use --device cpu")
        if world <= 1:
            return cls(device=torch.device("cuda" if use_cuda else "cpu"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local)
        created = not dist.is_initialized()
        if created:
            dist.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), dev, created)

    def sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        # float64 so integer counts stay exact
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def broadcast_state(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere: BN running stats drift apart per rank during training
        (each rank updates them from its own batch), and rank 0's are the ones written to disk."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Every rank a disjoint slice (rank::world), no padding, so summed counts equal a single-process pass."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):  # noqa: ANN204 - Sampler protocol
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Metrics:
    correct: int
    total: int

    @property
    def top1(self) -> float:
        return 100.0 * self.correct / self.total if self.total else 0.0


def eval_loader(dataset: Dataset, batch_size: int, env: DistEnv | None = None, workers: int = 0) -> DataLoader:
    env = env or DistEnv()
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), env.rank, env.world_size),
                      num_workers=workers)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset | DataLoader, batch_size: int = 256, env: DistEnv | None = None
) -> Metrics:
    """Top-1 of ``model`` (put in eval mode) over ``data``; under DDP, summed over all ranks' shards."""
    env = env or DistEnv(device=next(model.parameters()).device)
    loader = data if isinstance(data, DataLoader) else eval_loader(data, batch_size, env)
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(env.device), y.to(env.device)
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    c, t = env.sum([float(correct), float(total)])
    return Metrics(int(c), int(t))


def _scheduler_state(sched: Any) -> dict[str, Any]:
    # MultiStepLR keeps milestones in a Counter; store a plain dict so the file is tensors + plain data.
    return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in sched.state_dict().items()}


def _load_scheduler_state(sched: Any, state: dict[str, Any]) -> None:
    current = sched.state_dict()
    fixed = {k: (Counter(v) if isinstance(current.get(k), Counter) else v) for k, v in state.items()}
    sched.load_state_dict(fixed)


@dataclass
class _Resume:
    stage: int
    epoch: int  # last completed epoch within ``stage``
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    best_value: float | None
    history: list[dict[str, Any]]
    rng: torch.Tensor | None


def _read_resume(path: Path, config: TrainConfig, card: ModelCard) -> _Resume:
    obj = checkpoint.read_untrusted(path)
    if not isinstance(obj, dict) or obj.get("format") != checkpoint.FORMAT:
        raise UserError(f"{path}: not a BottleFit training state; resume from the last.pt a training run wrote")
    arch = ModelCard.from_dict(obj["card"]).arch if isinstance(obj.get("card"), dict) else None
    if arch != config.student:
        raise UserError(f"{path}: is a {arch} checkpoint, but the config trains {config.student} "
                        "(models.student_model.name); resume with the same architecture or start afresh")
    saved = registry.normalize_params(registry.get(arch), dict(obj["card"].get("params", {})))
    if saved != card.params:
        diff = sorted(k for k in card.params if saved.get(k) != card.params.get(k))
        raise UserError(f"{path}: was trained with {', '.join(f'{k}={saved.get(k)!r}' for k in diff)}, but the "
                        f"config asks for {', '.join(f'{k}={card.params.get(k)!r}' for k in diff)}")
    state = obj.get("train_state")
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds model weights only (no optimizer/scheduler state); resume from last.pt")
    return _Resume(int(state["stage"]), int(state["epoch"]), obj["model"], state["optimizer"], state["scheduler"],
                   state.get("best_value"), list(obj.get("history", [])), state.get("rng"))


def _train_loader(dataset: Dataset, config: TrainConfig, env: DistEnv) -> tuple[DataLoader, DistributedSampler]:
    # A DistributedSampler in single-process runs too: the per-epoch shuffle then depends only on (seed,
    # epoch), so a resumed run sees the same order an uninterrupted one would.
    sampler = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=config.seed)
    workers = config.num_workers if not isinstance(dataset, torch.utils.data.TensorDataset) else 0
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=False), sampler


def _emit(config: TrainConfig, env: DistEnv, log: Log, record: dict[str, Any]) -> None:
    if not env.is_main:
        return
    log(f"stage {record['stage']} epoch {record['epoch'] + 1}/{record['num_epochs']} "
        f"loss {record['loss']:.4f} top1 {record['top1']:.2f} lr {record['lr']:.2e}"
        + (" *best*" if record["best"] else ""))
    config.output_dir.mkdir(parents=True, exist_ok=True)
    with open(config.output_dir / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, log: Log = print, data: DataSplits | None = None) -> Path:
    """Run both stages as configured; returns the path of the best-validation-top-1 checkpoint (best.pt).

    ``data`` overrides ``data.root`` (the demo passes in-memory tensor datasets).
    """
    env = DistEnv.from_env(config.device)
    try:
        return _train(config, log, data, env)
    finally:
        env.close()


def _epochs_left(stage: StageConfig, resume: _Resume | None) -> int:
    """Epochs of ``stage`` still to run: all of them afresh, none for a stage the resumed run finished."""
    if resume is None or stage.index > resume.stage:
        return stage.num_epochs
    if stage.index < resume.stage:
        return 0
    return max(0, stage.num_epochs - resume.epoch - 1)


def _needs_teacher(stages: Sequence[StageConfig], resume: _Resume | None) -> bool:
    """A fresh run always loads the teacher (the student's kept tail is copied from it); a resumed one only
    when an epoch left to run distills from it (stage 1, or stage 2 with the kd criterion)."""
    return resume is None or any(
        _epochs_left(s, resume) > 0 and (s.index == 1 or s.criterion == "kd") for s in stages)


@dataclass
class _Run:
    """Everything one training run shares across its stages and epochs."""

    config: TrainConfig
    env: DistEnv
    log: Log
    arch: registry.Architecture
    student: nn.Module
    card: ModelCard
    teacher: nn.Module | None
    resume: _Resume | None
    loader: DataLoader
    sampler: DistributedSampler
    val: DataLoader
    progress: bool  # a progress bar on rank 0's terminal
    history: list[dict[str, Any]]
    best_value: float | None

    @property
    def best_path(self) -> Path:
        return self.config.output_dir / BEST


@dataclass
class _StageRun:
    """One stage, switched to: its frozen modules set, its trainable graph, optimizer and scheduler."""

    stage: StageConfig
    runner: Stage1 | Stage2
    model: nn.Module  # the trainable graph, wrapped in DDP under torchrun
    opt: torch.optim.Optimizer
    sched: Any


def _build_student(config: TrainConfig, env: DistEnv) -> tuple[nn.Module, ModelCard]:
    torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    student, card = registry.build(config.student, config.student_params, weights="checkpoint")
    student.to(env.device)
    return student, card


def _training_data(config: TrainConfig, card: ModelCard, data: DataSplits | None) -> DataSplits:
    if data is not None:
        return data
    if config.data_root is None:
        raise UserError(f"{config.source}: no training data: pass --data DIR (data.root) with train/ and val/")
    return image_folder_splits(config.data_root, card, config.augment)


def _load_teacher(config: TrainConfig, env: DistEnv, log: Log, student: nn.Module, card: ModelCard,
                  resume: _Resume | None) -> nn.Module | None:
    """The teacher, when an epoch left needs it; a fresh run also copies its kept tail into the student."""
    if not _needs_teacher(config.stages, resume):
        return None
    teacher = prepare_teacher(config.student, config.teacher, card.num_classes, config.teacher_weights,
                              config.source).to(env.device)
    if resume is None:
        n = init_student_from_teacher(student, teacher)
        if env.is_main:
            log(f"student {config.student}: {n} tensors of the kept tail copied from the teacher")
    return teacher


def _start_run(config: TrainConfig, log: Log, data: DataSplits | None, env: DistEnv) -> _Run:
    """Student, data, resumed state and teacher, in the order that keeps the RNG stream of a fresh run."""
    arch = registry.get(config.student)
    student, card = _build_student(config, env)
    data = _training_data(config, card, data)
    resume = _read_resume(config.resume, config, card) if config.resume is not None else None
    if resume is not None:
        student.load_state_dict(resume.model, strict=True)
    teacher = _load_teacher(config, env, log, student, card, resume)
    if resume is not None and resume.rng is not None:
        torch.set_rng_state(resume.rng)
    if env.is_main and resume is not None:
        log(f"resuming from {config.resume}: stage {resume.stage}, epoch {resume.epoch + 1} done")
    loader, sampler = _train_loader(data.train, config, env)
    val = eval_loader(data.val, config.val_batch_size, env,
                      0 if isinstance(data.val, torch.utils.data.TensorDataset) else config.num_workers)
    return _Run(config, env, log, arch, student, card, teacher, resume, loader, sampler, val,
                progress=env.is_main and sys.stderr.isatty(), history=list(resume.history) if resume else [],
                best_value=resume.best_value if resume else None)


def _switch_stage(run: _Run, stage: StageConfig) -> _StageRun:
    """Freeze what ``stage`` freezes, build its loss graph, optimizer and scheduler (resumed ones restored)."""
    key = f"train.stage{stage.index}"
    set_frozen(run.student, frozen_modules(stage, run.student, run.arch.encoder_path))
    runner: Stage1 | Stage2 = (Stage1(run.student, run.teacher, run.card.input_shape) if stage.index == 1
                               else Stage2(run.student, run.teacher if stage.criterion == "kd" else None, stage))
    graph = runner.trainable()
    model = DistributedDataParallel(graph) if run.env.world_size > 1 else graph
    opt = make_optimizer(graph, stage.optimizer, f"{key}.optimizer", run.config.source)
    sched = make_scheduler(opt, stage.scheduler, f"{key}.scheduler", run.config.source)
    if run.resume is not None and run.resume.stage == stage.index:
        opt.load_state_dict(run.resume.optimizer)
        _load_scheduler_state(sched, run.resume.scheduler)
    return _StageRun(stage, runner, model, opt, sched)


def _train_one_epoch(run: _Run, sr: _StageRun, epoch: int) -> float:
    """One pass over the training shard, then one scheduler step; the mean batch loss over all ranks."""
    run.sampler.set_epoch(sr.stage.index * 100_000 + epoch)
    run.student.train()  # frozen modules too: their BN statistics keep updating, as upstream
    loss_sum, batches = 0.0, 0
    for x, y in tqdm(run.loader, desc=f"stage {sr.stage.index} epoch {epoch + 1}", disable=not run.progress,
                     leave=False):
        x, y = x.to(run.env.device), y.to(run.env.device)
        sr.opt.zero_grad(set_to_none=True)
        loss = sr.runner.loss(sr.model, x, y)
        loss.backward()
        sr.opt.step()
        loss_sum += float(loss.detach())
        batches += 1
    sr.sched.step()  # per epoch (upstream scheduling_step 0)
    loss_sum, batches = run.env.sum([loss_sum, float(batches)])
    return loss_sum / max(batches, 1.0)


def _validate(run: _Run) -> Metrics:
    """Top-1 of the full student on the validation set, with rank 0's weights and BN statistics everywhere."""
    run.env.broadcast_state(run.student)
    return evaluate(run.student, run.val, env=run.env)


def _track_best(run: _Run, top1: float) -> bool:
    """Whether ``top1`` beats every epoch so far (over both stages); if so it becomes the best."""
    improved = run.best_value is None or top1 > run.best_value
    if improved:
        run.best_value = top1
    return improved


def _save_checkpoints(run: _Run, sr: _StageRun, epoch: int, improved: bool) -> None:
    """Rank 0 only: ``best.pt`` when the epoch improved, ``last.pt`` (the full training state) always."""
    if not run.env.is_main:
        return
    if improved:
        checkpoint.save(run.best_path, run.student, run.card, best_value=run.best_value, epoch=epoch,
                        stage=sr.stage.index, history=run.history)
    state = {"stage": sr.stage.index, "epoch": epoch, "optimizer": sr.opt.state_dict(),
             "scheduler": _scheduler_state(sr.sched), "best_value": run.best_value, "rng": torch.get_rng_state()}
    checkpoint.save(run.config.output_dir / LAST, run.student, run.card, train_state=state, history=run.history,
                    config=run.config.tree)


def _run_epoch(run: _Run, sr: _StageRun, epoch: int) -> None:
    lr = float(sr.opt.param_groups[0]["lr"])  # before the epoch's scheduler step
    loss = _train_one_epoch(run, sr, epoch)
    metrics = _validate(run)
    improved = _track_best(run, metrics.top1)
    record = {"stage": sr.stage.index, "epoch": epoch, "num_epochs": sr.stage.num_epochs, "loss": loss,
              "top1": metrics.top1, "correct": metrics.correct, "total": metrics.total, "lr": lr, "best": improved}
    run.history.append(record)
    _save_checkpoints(run, sr, epoch, improved)
    _emit(run.config, run.env, run.log, record)
    run.env.barrier()  # nobody starts the next epoch (or returns) before the files are written


def _run_stage(run: _Run, stage: StageConfig) -> None:
    todo = _epochs_left(stage, run.resume)
    if todo == 0:
        return
    sr = _switch_stage(run, stage)
    for epoch in range(stage.num_epochs - todo, stage.num_epochs):
        _run_epoch(run, sr, epoch)
    sr.runner.close()


def _train(config: TrainConfig, log: Log, data: DataSplits | None, env: DistEnv) -> Path:
    run = _start_run(config, log, data, env)
    for stage in config.stages:
        _run_stage(run, stage)
    for p in run.student.parameters():
        p.requires_grad_(True)
    if not run.best_path.is_file():
        raise UserError(f"{config.source}: nothing was trained (train.stage1/stage2.num_epochs are 0) and "
                        f"{run.best_path} does not exist")
    return run.best_path


def train_teacher(arch: str, data: DataSplits, out_path: str | Path, epochs: int = 3, lr: float = 1e-3,
                  batch_size: int = 64, seed: int = 0, log: Log = print) -> tuple[Path, float]:
    """Train the architecture's teacher from scratch (Adam, cross-entropy) and save its bare torchvision-style
    state_dict, the file ``--teacher-weights`` expects. For the small demo variants, which have no published
    weights. Returns (path, val top-1 in percent)."""
    spec = registry.get(arch)
    num_classes = int(spec.defaults.get("num_classes", 1000))
    torch.manual_seed(seed)
    teacher = build_teacher(spec.teacher, num_classes)
    opt = torch.optim.Adam(teacher.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data.train, batch_size=batch_size, shuffle=True, generator=gen)
    top1 = 0.0
    for epoch in range(epochs):
        teacher.train()
        total = 0.0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(teacher(x), y)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        top1 = evaluate(teacher, data.val).top1
        log(f"teacher {spec.teacher} epoch {epoch + 1}/{epochs} loss {total / max(len(loader), 1):.4f} "
            f"top1 {top1:.2f}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in teacher.state_dict().items()}, out_path)
    return out_path, top1
