"""The record of one execution: an artifact in its target runtime on some CPU, against its reference semantics.

Targets make these for the runs only they know how to do (a board's own scripts under emulation); parity makes
them for this host's kernels. Kept here, below both, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Where(StrEnum):
    """Where an execution ran: this host's own kernels, the target's ISA under emulation, or the board itself."""

    HOST = "host"
    EMULATED = "emulated"
    BOARD = "board"


class Status(StrEnum):
    AGREES = "agrees"  # within the agreement tolerances of the artifact's reference semantics
    DEVIATES = "deviates"
    FAILED = "failed"  # it did not run to the end (an error, a timeout)
    NOT_RUN = "not run"  # cannot run here (the record says where it must)


WHERE = tuple(Where)
STATUS = tuple(Status)


@dataclass
class Execution:
    artifact: str
    runtime: str
    where: Where
    isa: str  # e.g. "x86_64 (avx2)", "aarch64 cortex-a72 (Raspberry Pi 4, qemu-user)"
    gated: bool  # whether it decides the verdict: only runs on the target's own ISA do
    status: Status
    metrics: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        self.where, self.status = Where(self.where), Status(self.status)

    @property
    def passed(self) -> bool:
        return not self.gated or self.status == Status.AGREES

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
