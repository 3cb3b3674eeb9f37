"""The record of one execution: an artifact in its target runtime on some CPU, against its reference semantics.

Targets make these for the runs only they know how to do (a board's own scripts under emulation); parity makes
them for this host's kernels. Kept here, below both, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

WHERE = ("host", "emulated", "board")
STATUS = ("agrees", "deviates", "failed", "not run")


@dataclass
class Execution:
    artifact: str
    runtime: str
    where: str  # host | emulated | board
    isa: str  # e.g. "x86_64 (avx2)", "aarch64 cortex-a72 (Raspberry Pi 4, qemu-user)"
    gated: bool  # whether it decides the verdict: only runs on the target's own ISA do
    status: str  # agrees | deviates | failed | not run
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.gated or self.status == "agrees"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Execution:
        return cls(**{k: d[k] for k in ("artifact", "runtime", "where", "isa", "gated", "status")},
                   metrics=dict(d.get("metrics", {})), note=str(d.get("note", "")))

    def line(self) -> str:
        m = self.metrics
        figs = []
        if m.get("max_abs_lsb") is not None:
            figs.append(f"max {m['max_abs_lsb']:.3g} LSB")
        if m.get("sqnr_db_vs_reference") is not None:
            figs.append(f"{m['sqnr_db_vs_reference']:.1f} dB vs reference")
        elif m.get("max_abs_lsb") == 0:
            figs.append("bit-identical to the reference")
        body = ", ".join(figs) if figs else self.note
        return (f"{self.artifact} on {self.where} {self.isa}: {self.status} ({body}; "
                f"{'gates' if self.gated else 'information'})")
