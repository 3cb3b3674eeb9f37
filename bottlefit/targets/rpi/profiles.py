"""Raspberry Pi boards as data: one row per board, the head the bundle runs by default and the measured costs why.

Costs are guest instructions retired per inference (millions, 1 thread, batch 1) of the ResNet-152 v2 (12 ch)
head with untrained (seeded random) weights, under qemu arm64 user-mode emulation of the board's core
(bottlefit.emulation.cost): a proxy for the board's time, not cycles, taken on the kernels each runtime's aarch64
wheel picks for that core. The head is the export's: the BatchNorm after the max-pool folded into the stem conv
(bottlefit.exporter.split.fold_head), which saved 0.8 M on every core (A72 ONNX Runtime u8 45.65 -> 44.82 M).
The default is the cheapest int8 head in those figures; fp32 TFLite with XNNPACK is the reference every ratio is
taken against. The figures are data: ``costs.json`` beside this module, written by bench/bench_pi_cost.py
``--update`` (its command, head, date and versions are in the file; ``--check`` compares a new run with it). A
board's costs are those measured on its core. The boards themselves (name, core, Features, cores) are rows of the
one board table, bottlefit/emulation/boards.json.

Keys of ``costs``: "<file>/<delegate>" where delegate is "xnnpack" or "builtin" for the .tflite heads (LiteRT with
XNNPACK, or its built-in kernels), "cpu" for head.int8.ncnn.param (ncnn's int8 kernels, fp32 semantics between
convs: its fp16 storage and arithmetic off), and for head.int8.onnx (ONNX Runtime's CPU provider) "cpu" (its int8 (S8S8)
kernels, as the file's types say) or "cpu-u8" (the session option ``session.qdqisint8allowed=0``: ONNX Runtime
shifts the int8 activations to uint8 and runs its U8S8 kernels; the same file, outputs bit-identical on the
emulated cores, measured). On cores without the dot product (A72, A53) the U8S8 GEMM retires 13% fewer
instructions (ORT_CONFIG); on the A76 the S8S8 dot-product kernels are as cheap or cheaper.

Where the cost goes (A72, head.int8.onnx, ONNX Runtime u8; ``bench_pi_cost.py --variants floor``): the 7x7
stride-2 conv over 3 input channels alone, as the optimized head runs it (NHWC uint8 QLinearConv), is 42.0 M of the
44.8 M: its U8S8 GEMM 33.5 M (118 M MACs, K = 147, which MLAS pads to 160; its fp32 SGEMM of the same shape costs
36.9 M: without the dot product the int8 GEMM saves only 9%), im2col 6.4 M (ONNX Runtime copies 7 runs of 21 bytes
per output pixel; its indirect convolution, which needs no im2col, is off on ARM64 below 64 input channels) and
requantization 2.1 M (the same conv as a 1x1 over pre-gathered patches: 35.6 M). Every ONNX Runtime int8 head of
this model also quantizes its input (0.45 M) and runs the bottleneck conv (0.8 M): at least 43.2 M, 0.57x (A72)
and 0.60x (A53, the same kernels) of fp32 TFLite + XNNPACK, so 0.55x is out of these runtimes' reach on cores
without the dot product; LiteRT's int8 kernels cost more (builtin 57.4 M; XNNPACK 135 M, below). On the A76 the
same conv is 20.6 M of 23.1 M. An exact space-to-depth form of that conv (bottlefit.exporter.head_rewrite,
``space_to_depth=True``) halves XNNPACK's int8 cost on the A72 (135.2 -> 72.5 M: XNNPACK's igemm pads the 3
channels of each kernel tap to its 8-channel block) but costs the MAC-bound kernels more (192 taps instead of 147:
ONNX Runtime u8 44.8 -> 55.1 M, built-in 57.4 -> 64.2 M), so no profile uses it.

ncnn (bottlefit.exporter.ncnn, bottlefit.runtimes.ncnn) is the cheapest head on every core: 37.9 M on the A72
(0.50x), 37.9 M on the A53 (0.52x), 18.2 M on the A76 (0.25x). Its kernels run the stem conv in about 37 M on the
A72 (a one-conv ncnn model of the same shape, measured once) where ONNX Runtime's take 42.0 M; even ncnn's fp32
head (``--variants ncnn``: 38.6 M on the A72) costs less there than every ONNX Runtime or LiteRT int8 head.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bottlefit.emulation.devicetime import Board, boards
from bottlefit.errors import UserError
from bottlefit.files import read_data_file

DEFAULT = "pi4"  # the paper's board
REFERENCE = "head.fp32.tflite/xnnpack"
COSTS_FILE = Path(__file__).with_name("costs.json")  # written by bench/bench_pi_cost.py --update
COSTS_SCHEMA = "bottlefit.picost/1"
# the heads a bundle ships and the cost bench measures, (file, runtime, delegate), in the order every costs record
# lists them
HEADS: tuple[tuple[str, str, str], ...] = (
    ("head.int8.tflite", "litert", "xnnpack"), ("head.int8.tflite", "litert", "builtin"),
    ("head.fp32.tflite", "litert", "xnnpack"), ("head.fp32.tflite", "litert", "builtin"),
    ("head.int8.onnx", "onnxruntime", "cpu"), ("head.int8.onnx", "onnxruntime", "cpu-u8"),
    ("head.int8.ncnn.param", "ncnn", "cpu"),
)
# /proc/cpuinfo Features that select no kernel of these runtimes: the crypto extensions, the timer's event stream
# and EL0 access to the ID registers. The profile records the rest (qemu's models add the crypto bits to HWCAP
# where the Pi 4/3/Zero 2 lack them; the runtimes never read them).
NOT_KERNEL_FEATURES = frozenset({"aes", "pmull", "sha1", "sha2", "evtstrm", "cpuid"})


# ONNX Runtime session config entries per head.int8.onnx "delegate" (see the module doc)
ORT_CONFIG: dict[str, dict[str, str]] = {"cpu": {}, "cpu-u8": {"session.qdqisint8allowed": "0"}}


@dataclass(frozen=True)
class RpiProfile:
    name: str  # pi4 | pi5 | pi3 | zero2
    board: str
    core: str  # the QEMU_CPU / ARM name of the core ("cortex-a72")
    features: tuple[str, ...]  # the int8-relevant ISA features ("asimd", "asimddp" = dot product)
    threads: int  # cores the board has: run_head.py's default thread count
    model: str  # the default head file
    runtime: str  # litert | onnxruntime | ncnn
    delegate: str  # xnnpack | builtin (litert), cpu | cpu-u8 (onnxruntime, ORT_CONFIG), cpu (ncnn)
    costs: dict[str, float] = field(default_factory=dict)  # M guest instructions per inference, see module doc
    why: str = ""

    @property
    def dotprod(self) -> bool:
        return "asimddp" in self.features

    @property
    def default_key(self) -> str:
        return f"{self.model}/{self.delegate}"

    @property
    def ort_session_config(self) -> dict[str, str]:
        """Session config entries for head.int8.onnx on this core: those of its cheapest measured ONNX Runtime
        delegate (they choose kernels, not results), whichever head is the default."""
        ort = {k.partition("/")[2]: v for k, v in self.costs.items() if k.partition("/")[0].endswith(".onnx")}
        best = min(ort, key=lambda d: ort[d]) if ort else "cpu"
        return dict(ORT_CONFIG.get(best, {}))

    def choose(self, files: set[str]) -> RpiProfile:
        """This profile for an export holding ``files``: itself when its default head is among them, else the
        cheapest measured int8 head that is (the ncnn head is skipped for heads its writer cannot express)."""
        if self.model in files:
            return self
        int8 = _int8_costs(self.costs, files)
        if not int8:
            return self
        best = min(int8, key=lambda k: int8[k])
        model, _, delegate = best.partition("/")
        return replace(self, model=model, runtime=_runtime(model), delegate=delegate,
                       why=f"{self.model} is not in this export; the cheapest int8 head that is: {best} at "
                           f"{int8[best]:.1f} M instructions; measured: {self.why}")

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
                "ort_session_config": self.ort_session_config,
                "why": self.why, "ratio_vs_fp32_tflite": None if self.ratio() is None else round(self.ratio(), 3),
                "costs_minstr_per_inference": dict(self.costs), "cost_head": COST_HEAD, "cost_command": COST_COMMAND,
                "cost_unit": "millions of guest instructions per inference under qemu-user (not cycles)"}


def _runtime(model: str) -> str:
    return {".onnx": "onnxruntime", ".param": "ncnn"}.get(Path(model).suffix, "litert")


def _int8_costs(costs: dict[str, float], files: set[str] | None = None) -> dict[str, float]:
    """The int8 heads' costs, of those among ``files`` when given."""
    return {k: v for k, v in costs.items() if "int8" in k and (files is None or k.partition("/")[0] in files)}


@dataclass(frozen=True)
class CostRun:
    """The cost bench's run (``costs.json``): how it was made and the costs per core, every head it measured."""

    command: str
    head: str  # the head measured, in words
    per_core: dict[str, dict[str, float]]  # core -> "<file>/<delegate>" -> M guest instructions per inference


def read_costs(path: Path = COSTS_FILE, table: Iterable[Board] | None = None) -> CostRun:
    """The cost bench's data file; each measured profile's costs filed under its board's core."""
    doc = read_data_file(path, COSTS_SCHEMA, "the Pi head costs", "bench/bench_pi_cost.py --update")
    core = {b.name: b.core for b in (boards() if table is None else table)}
    per_core: dict[str, dict[str, float]] = {}
    for measured, costs in doc["costs_minstr"].items():
        if measured not in core:
            raise UserError(f"{path}: costs measured on {measured!r}, a board the board table lacks "
                            f"({', '.join(core)}): rerun bench/bench_pi_cost.py --update")
        per_core.setdefault(core[measured], {k: float(v) for k, v in costs.items()})
    return CostRun(doc["command"], doc["head"], per_core)


def make_profiles(run: CostRun, table: Iterable[Board] | None = None) -> dict[str, RpiProfile]:
    """One profile per board of the board table that has one, costed by ``run`` on the board's core."""
    out: dict[str, RpiProfile] = {}
    for b in boards() if table is None else table:
        if not b.profile:
            continue
        if b.core not in run.per_core:
            raise UserError(f"{COSTS_FILE}: no costs measured on {b.core} (board {b.name}): rerun "
                            "bench/bench_pi_cost.py --update with a board of that core in --profiles")
        measured = run.per_core[b.core]
        costs = {f"{f}/{d}": measured[f"{f}/{d}"] for f, _, d in HEADS}
        features = tuple(f for f in b.features if f not in NOT_KERNEL_FEATURES)
        out[b.profile] = _profile(b.profile, b.short_name, b.core, features, costs, b.cores)
    return out


def _profile(name: str, board: str, core: str, features: tuple[str, ...], costs: dict[str, float],
             threads: int) -> RpiProfile:
    ref = costs[REFERENCE]
    int8 = _int8_costs(costs)
    best = min(int8, key=lambda k: int8[k])
    model, _, delegate = best.partition("/")
    runtime = _runtime(model)
    why = (f"cheapest int8 head measured on {core}: {best} at {int8[best]:.1f} M instructions, "
           f"{int8[best] / ref:.2f}x fp32 TFLite+XNNPACK ({ref:.1f} M); "
           + "; ".join(f"{k} {v / ref:.2f}x" for k, v in sorted(int8.items()) if k != best))
    return RpiProfile(name, board, core, features, threads, model, runtime, delegate, dict(costs), why)


_RUN = read_costs()
COST_COMMAND = _RUN.command
COST_HEAD = _RUN.head
PROFILES: dict[str, RpiProfile] = make_profiles(_RUN)


def names() -> tuple[str, ...]:
    return tuple(PROFILES)


def get_profile(name: str | None) -> RpiProfile:
    """The row for ``name`` (None: DEFAULT), or UserError naming the known boards."""
    try:
        return PROFILES[name or DEFAULT]
    except KeyError:
        raise UserError(f"--profile {name!r} for --target rpi: choose one of {', '.join(PROFILES)}") from None
