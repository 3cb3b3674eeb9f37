"""Two processes under torchrun (gloo, CPU) through the CLI entry point on an ImageFolder tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bottlefit.models import checkpoint, registry
from bottlefit.training import evaluate, image_folder_splits, mnist_splits, train_teacher, write_mnist_image_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_torchrun_two_processes_metrics_equal_single_process_eval(tmp_path: Path) -> None:
    torch.set_num_threads(1)  # see test_stages: one thread copes best with a contended 2-core box
    _, card = registry.build("mini_resnet")
    weights, _ = train_teacher("mini_resnet", mnist_splits(card, n_train=1500, n_val=500), tmp_path / "t.pt",
                               epochs=2, log=lambda s: None)
    data_dir = write_mnist_image_folder(tmp_path / "digits", n_train=1600, n_val=201)  # odd: uneven shards
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "bottlefit.training.cli", "--arch", "mini_resnet", "--data", str(data_dir),
           "--teacher-weights", str(weights), "--out", str(out), "--stage1-epochs", "2",
           "--stage2-epochs", "1", "--batch-size", "32", "--workers", "0", "--device", "cpu",
           "--no-augment"]  # the authors' crops and flips suit photos, not 28x28 digits
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best checkpoint:") == 1  # rank 0 alone reports and logs
    assert proc.stdout.count("stage 2 epoch 1/1") == 1

    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [(1, 0), (1, 1), (2, 0)]
    assert all(r["total"] == 201 for r in records)  # every val image counted once over both ranks

    val = image_folder_splits(data_dir, card).val
    best = checkpoint.load(out / "best.pt")
    single = evaluate(best.model, val, batch_size=64)
    best_record = max(records, key=lambda r: r["top1"])
    print("ddp records", [(r["stage"], r["epoch"], round(r["loss"], 3), r["correct"]) for r in records],
          "single-process eval of best.pt:", single)
    assert single.correct == best_record["correct"] and single.total == 201
    assert best.meta["best_value"] == single.top1
    last = checkpoint.load(out / "last.pt")
    assert evaluate(last.model, val, batch_size=64).correct == records[-1]["correct"]
