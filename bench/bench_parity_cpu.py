"""CPU seconds (process time: every thread counts) of each part of parity.verify on an export folder: the PyTorch
fp32 reference, each head's tail, each runner (named by what computed it), the host executions and the reference
cross-check. It wraps the functions parity calls and changes nothing they compute. CPU seconds, not wall: the
figures hold on a loaded machine (torch's threads spinning on a busy host still inflate them).

  python bench/bench_parity_cpu.py OUT/rpi [--json figures.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import bottlefit.parity.verify as pv
import bottlefit.runtimes.head as head_mod
from bottlefit.exporter.manifest import read_manifest
from bottlefit.exporter.split import fold_head, split
from bottlefit.models.card import ModelCard
from bottlefit.pipeline import source
from bottlefit.pipeline.verify import check_hashes, heldout_for

CPU: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter[str] = collections.Counter()


def timed(key: str, f: Callable[..., Any], *a: Any, **k: Any) -> Any:
    t = time.process_time()
    try:
        return f(*a, **k)
    finally:
        CPU[key] += time.process_time() - t
        CALLS[key] += 1


class Timed(torch.nn.Module):
    def __init__(self, m: torch.nn.Module, key: str) -> None:
        super().__init__()
        self.m, self.key = m, key

    def forward(self, *a: Any) -> Any:
        return timed(self.key, self.m, *a)


def instrument() -> None:
    run_runner = head_mod.run_runner

    def rr(runner: Any, art: Any, x: Any) -> Any:
        by = getattr(runner, "evaluator", None) or type(runner).__name__ + (" reference" if getattr(
            runner, "reference", False) else "")
        return timed(f"run {art.file} [{by}]", run_runner, runner, art, x)

    head_mod.run_runner = rr
    if hasattr(pv, "run_runner"):
        pv.run_runner = rr
    for name in ("host_execution", "reference_cross_check"):
        if hasattr(pv, name):
            setattr(pv, name, _wrap(name, getattr(pv, name)))


def _wrap(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *a, **k: timed(name, f, *a, **k)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    instrument()
    manifest = read_manifest(a.export)
    artifacts = check_hashes(a.export, manifest)
    card = ModelCard.from_dict(manifest["model_card"])
    lm = source.reload(manifest["source"], None)
    held = heldout_for(manifest, card, None)
    sm = split(lm.model, lm.card)
    if manifest.get("equalization"):
        from bottlefit.exporter.equalize import apply_equalization

        sm = apply_equalization(sm, manifest["equalization"])
    if manifest.get("head_folds"):
        sm, _ = fold_head(sm)
    sm.model = Timed(sm.model, "torch fp32 model (reference logits)")
    sm.tail = Timed(sm.tail, "torch tail (logits of each head)")
    sm.head = Timed(sm.head, "torch head (reference bottleneck)")
    t, w = time.process_time(), time.perf_counter()
    verdict = pv.verify(sm, artifacts, a.export, manifest["target"], held.images, held.describe(), {})
    total, wall = time.process_time() - t, time.perf_counter() - w
    print(f"{a.export}: {len(held.images)} images; parity.verify {total:.2f} s CPU ({wall:.1f} s wall); "
          f"passed {verdict.passed}")
    for k, s in sorted(CPU.items(), key=lambda kv: -kv[1]):
        print(f"  {s:7.2f} s CPU  {CALLS[k]:2d}x  {k}")
    for e in verdict.execution:
        print(f"  execution: {e.line()}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"images": len(held.images), "total_cpu_s": total, "wall_s": wall,
                                      "cpu_s": dict(CPU), "calls": dict(CALLS)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
