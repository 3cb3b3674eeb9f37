"""Raspberry Pi boards as data: one row per board, the head the bundle runs by default and the measured costs why.

Costs are guest instructions retired per inference (millions, 1 thread, batch 1) of the ResNet-152 v2 (12 ch)
head with untrained (seeded random) weights, under qemu arm64 user-mode emulation of the board's core
(bottlefit.emulation.cost): a proxy for the board's time, not cycles, taken on the kernels each runtime's aarch64
wheel picks for that core. The default is the cheapest int8 head in those figures; fp32 TFLite with XNNPACK is the
reference every ratio is taken against. Made by ``COST_COMMAND`` (bench/bench_pi_cost.py) on 2026-11-30 with
ai-edge-litert 2.3.0, onnxruntime 1.32.0, qemu 7.2.

Keys of ``costs``: "<file>/<delegate>" where delegate is "xnnpack" or "builtin" for the .tflite heads (LiteRT with
XNNPACK, or its built-in kernels) and "cpu" for head.int8.onnx (ONNX Runtime's CPU provider).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bottlefit.errors import UserError

DEFAULT = "pi4"  # the paper's board
REFERENCE = "head.fp32.tflite/xnnpack"
COST_COMMAND = ("PYTHONPATH=. .venv/bin/python bench/bench_pi_cost.py --arch custom_resnet152 "
                "--bottleneck-channel 12 --bottleneck-ver 2 --profiles pi4,pi5,pi3")
COST_HEAD = "custom_resnet152 bottleneck_ver 2, 12 channels, untrained (seeded), 224x224, batch 1, 1 thread"


@dataclass(frozen=True)
class RpiProfile:
    name: str  # pi4 | pi5 | pi3 | zero2
    board: str
    core: str  # the QEMU_CPU / ARM name of the core ("cortex-a72")
    features: tuple[str, ...]  # the int8-relevant ISA features ("asimd", "asimddp" = dot product)
    threads: int  # cores the board has: run_head.py's default thread count
    model: str  # the default head file
    runtime: str  # litert | onnxruntime
    delegate: str  # xnnpack | builtin (litert), cpu (onnxruntime)
    costs: dict[str, float] = field(default_factory=dict)  # M guest instructions per inference, see module doc
    why: str = ""

    @property
    def dotprod(self) -> bool:
        return "asimddp" in self.features

    @property
    def default_key(self) -> str:
        return f"{self.model}/{self.delegate}"

    def ratio(self, key: str | None = None) -> float | None:
        """Cost of ``key`` (default: the profile's default) over fp32 TFLite + XNNPACK on this core."""
        ref, val = self.costs.get(REFERENCE), self.costs.get(key or self.default_key)
        return None if not ref or val is None else val / ref

    def describe(self) -> str:
        r = self.ratio()
        cost = f", {self.costs[self.default_key]:.1f} M instructions ({r:.2f}x fp32 TFLite)" if r else ""
        return f"{self.name} ({self.board}, {self.core}): {self.model} in {self.runtime} ({self.delegate}){cost}"

    def record(self) -> dict[str, Any]:
        """What the manifest and golden.json record: the choice and why (the measured costs)."""
        return {"name": self.name, "board": self.board, "core": self.core, "features": list(self.features),
                "threads": self.threads, "model": self.model, "runtime": self.runtime, "delegate": self.delegate,
                "why": self.why, "ratio_vs_fp32_tflite": None if self.ratio() is None else round(self.ratio(), 3),
                "costs_minstr_per_inference": dict(self.costs), "cost_head": COST_HEAD, "cost_command": COST_COMMAND,
                "cost_unit": "millions of guest instructions per inference under qemu-user (not cycles)"}


_A53_A72 = ("fp", "asimd", "crc32")
_A76 = ("fp", "asimd", "crc32", "atomics", "fphp", "asimdhp", "asimdrdm", "lrcpc", "dcpop", "asimddp")

# measured with bench/bench_pi_cost.py (COST_COMMAND), see the module doc
_COST_A72 = {"head.int8.tflite/xnnpack": 135.89, "head.int8.tflite/builtin": 58.39, "head.fp32.tflite/xnnpack": 76.78,
             "head.fp32.tflite/builtin": 56.46, "head.int8.onnx/cpu": 52.34}
_COST_A76 = {"head.int8.tflite/xnnpack": 37.04, "head.int8.tflite/builtin": 32.90, "head.fp32.tflite/xnnpack": 74.14,
             "head.fp32.tflite/builtin": 56.46, "head.int8.onnx/cpu": 23.58}
_COST_A53 = {"head.int8.tflite/xnnpack": 66.28, "head.int8.tflite/builtin": 68.31, "head.fp32.tflite/xnnpack": 73.16,
             "head.fp32.tflite/builtin": 80.06, "head.int8.onnx/cpu": 52.34}

PROFILES: dict[str, RpiProfile] = {}


def _add(name: str, board: str, core: str, features: tuple[str, ...], costs: dict[str, float],
         threads: int = 4) -> None:
    ref = costs[REFERENCE]
    int8 = {k: v for k, v in costs.items() if "int8" in k}
    best = min(int8, key=lambda k: int8[k])
    model, _, delegate = best.partition("/")
    runtime = "onnxruntime" if model.endswith(".onnx") else "litert"
    why = (f"cheapest int8 head measured on {core}: {best} at {int8[best]:.1f} M instructions, "
           f"{int8[best] / ref:.2f}x fp32 TFLite+XNNPACK ({ref:.1f} M); "
           + "; ".join(f"{k} {v / ref:.2f}x" for k, v in sorted(int8.items()) if k != best))
    PROFILES[name] = RpiProfile(name, board, core, features, threads, model, runtime, delegate, dict(costs), why)


_add("pi4", "Raspberry Pi 4", "cortex-a72", _A53_A72, _COST_A72)
_add("pi5", "Raspberry Pi 5", "cortex-a76", _A76, _COST_A76)
_add("pi3", "Raspberry Pi 3", "cortex-a53", _A53_A72, _COST_A53)
_add("zero2", "Raspberry Pi Zero 2 W", "cortex-a53", _A53_A72, _COST_A53)


def names() -> tuple[str, ...]:
    return tuple(PROFILES)


def get_profile(name: str | None) -> RpiProfile:
    """The row for ``name`` (None: DEFAULT), or UserError naming the known boards."""
    try:
        return PROFILES[name or DEFAULT]
    except KeyError:
        raise UserError(f"--profile {name!r} for --target rpi: choose one of {', '.join(PROFILES)}") from None
