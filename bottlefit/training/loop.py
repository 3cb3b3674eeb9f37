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
from collections.abc import Callable
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


def _train(config: TrainConfig, log: Log, data: DataSplits | None, env: DistEnv) -> Path:
    arch = registry.get(config.student)
    torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    student, card = registry.build(config.student, config.student_params, weights="checkpoint")
    student.to(env.device)
    if data is None:
        if config.data_root is None:
            raise UserError(f"{config.source}: no training data: pass --data DIR (data.root) with train/ and val/")
        data = image_folder_splits(config.data_root, card, config.augment)

    resume = _read_resume(config.resume, config, card) if config.resume is not None else None
    if resume is not None:
        student.load_state_dict(resume.model, strict=True)
    history: list[dict[str, Any]] = list(resume.history) if resume else []
    best_value: float | None = resume.best_value if resume else None
    out = config.output_dir
    best_path = out / BEST

    def remaining(stage: StageConfig) -> int:
        if resume is None or stage.index > resume.stage:
            return stage.num_epochs
        if stage.index < resume.stage:
            return 0
        return max(0, stage.num_epochs - resume.epoch - 1)

    need_teacher = resume is None or any(
        remaining(s) > 0 and (s.index == 1 or s.criterion == "kd") for s in config.stages)
    teacher = None
    if need_teacher:
        teacher = prepare_teacher(config.student, config.teacher, card.num_classes, config.teacher_weights,
                                  config.source).to(env.device)
        if resume is None:
            n = init_student_from_teacher(student, teacher)
            if env.is_main:
                log(f"student {config.student}: {n} tensors of the kept tail copied from the teacher")
    if resume is not None and resume.rng is not None:
        torch.set_rng_state(resume.rng)
    if env.is_main and resume is not None:
        log(f"resuming from {config.resume}: stage {resume.stage}, epoch {resume.epoch + 1} done")

    progress = env.is_main and sys.stderr.isatty()
    loader, sampler = _train_loader(data.train, config, env)
    val = eval_loader(data.val, config.val_batch_size, env,
                      0 if isinstance(data.val, torch.utils.data.TensorDataset) else config.num_workers)
    for stage in config.stages:
        todo = remaining(stage)
        if todo == 0:
            continue
        first = stage.num_epochs - todo
        key = f"train.stage{stage.index}"
        set_frozen(student, frozen_modules(stage, student, arch.encoder_path))
        runner: Stage1 | Stage2 = (Stage1(student, teacher, card.input_shape) if stage.index == 1
                                   else Stage2(student, teacher if stage.criterion == "kd" else None, stage))
        graph = runner.trainable()
        model = DistributedDataParallel(graph) if env.world_size > 1 else graph
        opt = make_optimizer(graph, stage.optimizer, f"{key}.optimizer", config.source)
        sched = make_scheduler(opt, stage.scheduler, f"{key}.scheduler", config.source)
        if resume is not None and resume.stage == stage.index:
            opt.load_state_dict(resume.optimizer)
            _load_scheduler_state(sched, resume.scheduler)
        for epoch in range(first, stage.num_epochs):
            sampler.set_epoch(stage.index * 100_000 + epoch)
            lr = float(opt.param_groups[0]["lr"])
            student.train()  # frozen modules too: their BN statistics keep updating, as upstream
            loss_sum, batches = 0.0, 0
            for x, y in tqdm(loader, desc=f"stage {stage.index} epoch {epoch + 1}", disable=not progress,
                             leave=False):
                x, y = x.to(env.device), y.to(env.device)
                opt.zero_grad(set_to_none=True)
                loss = runner.loss(model, x, y)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach())
                batches += 1
            sched.step()  # per epoch (upstream scheduling_step 0)
            loss_sum, batches = env.sum([loss_sum, float(batches)])
            env.broadcast_state(student)
            metrics = evaluate(student, val, env=env)
            improved = best_value is None or metrics.top1 > best_value
            if improved:
                best_value = metrics.top1
            record = {"stage": stage.index, "epoch": epoch, "num_epochs": stage.num_epochs,
                      "loss": loss_sum / max(batches, 1.0), "top1": metrics.top1, "correct": metrics.correct,
                      "total": metrics.total, "lr": lr, "best": improved}
            history.append(record)
            if env.is_main:
                if improved:
                    checkpoint.save(best_path, student, card, best_value=best_value, epoch=epoch,
                                    stage=stage.index, history=history)
                state = {"stage": stage.index, "epoch": epoch, "optimizer": opt.state_dict(),
                         "scheduler": _scheduler_state(sched), "best_value": best_value,
                         "rng": torch.get_rng_state()}
                checkpoint.save(out / LAST, student, card, train_state=state, history=history,
                                config=config.tree)
            _emit(config, env, log, record)
            env.barrier()  # nobody starts the next epoch (or returns) before the files are written
        runner.close()
    for p in student.parameters():
        p.requires_grad_(True)
    if not best_path.is_file():
        raise UserError(f"{config.source}: nothing was trained (train.stage1/stage2.num_epochs are 0) and "
                        f"{best_path} does not exist")
    return best_path


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
