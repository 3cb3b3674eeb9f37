"""An energy MODEL per inference for ``bench split --paper``: published board and radio power x predicted times.

Nothing here is measured by bottlefit. The constants (board idle and loaded watts, each radio's power while
transferring, its promotion and tail) live in ``energy.json`` beside this module with their sources; this module
only does the arithmetic:

* board: busy watts while the device computes, idle watts while it waits for the network and the server;
* radio (Huang et al. 2012): while a direction transfers at R Mbit/s the radio draws alpha x R + beta; while the
  device waits for the round trips and the server it stays connected at tail power;
* per connection: one promotion and one full tail, paid once per connection. The headline is for frames streamed
  over a kept-alive connection (the per-connection energy amortised away); ``connection_j`` is printed beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("energy.json")


@cache
def constants() -> dict[str, Any]:
    return dict(json.loads(DATA.read_text()))


@dataclass(frozen=True)
class BoardPower:
    name: str
    idle_w: float
    load_all_cores_w: float
    cores: int

    def busy_w(self, threads: int = 1) -> float:
        """Watts with ``threads`` cores busy: idle + the all-cores increment pro rata (energy.json's rule)."""
        return self.idle_w + (self.load_all_cores_w - self.idle_w) * min(threads, self.cores) / self.cores


@dataclass(frozen=True)
class RadioPower:
    name: str
    alpha_up_mw_per_mbit: float
    alpha_down_mw_per_mbit: float
    beta_mw: float
    promotion_ms: float
    promotion_mw: float
    tail_ms: float
    tail_mw: float

    def transfer_j(self, up_ms: float, down_ms: float, rate_mbit: float) -> float:
        """Joules while the uplink, then the downlink, transfer at ``rate_mbit`` (one direction at a time)."""
        up_w = (self.alpha_up_mw_per_mbit * rate_mbit + self.beta_mw) / 1e3
        down_w = (self.alpha_down_mw_per_mbit * rate_mbit + self.beta_mw) / 1e3
        return up_w * up_ms / 1e3 + down_w * down_ms / 1e3

    def connection_j(self) -> float:
        """One promotion to the connected state and one full tail after the last byte."""
        return (self.promotion_mw * self.promotion_ms + self.tail_mw * self.tail_ms) / 1e6


def board(name: str) -> BoardPower:
    b = constants()["boards"][name]
    return BoardPower(name, float(b["idle_w"]), float(b["load_all_cores_w"]), int(b["cores"]))


def radio_for_link(link: str) -> RadioPower:
    c = constants()
    name = c["link_radio"][link]
    r = c["radios"][name]
    return RadioPower(name, *(float(r[k]) for k in ("alpha_up_mw_per_mbit", "alpha_down_mw_per_mbit", "beta_mw",
                                                     "promotion_ms", "promotion_mw", "tail_ms", "tail_mw")))


@dataclass(frozen=True)
class Energy:
    """Joules of one inference, by part; ``total_j`` is what the headline compares (streamed frames)."""

    compute_j: float  # the board busy while the device computes
    wait_j: float  # the board idle while it waits for the network and the server
    radio_j: float  # the radio transferring and connected while waiting (0 for local)
    connection_j: float  # one promotion + tail per connection, not in total_j

    @property
    def total_j(self) -> float:
        return self.compute_j + self.wait_j + self.radio_j


def inference_energy(power: BoardPower, *, device_ms: float, wait_ms: float, radio: RadioPower | None = None,
                     up_ms: float = 0.0, down_ms: float = 0.0, rate_mbit: float = 0.0,
                     threads: int = 1) -> Energy:
    """One inference: ``device_ms`` busy, ``wait_ms`` idle (network + server); with a ``radio``, ``up_ms`` and
    ``down_ms`` of ``wait_ms`` transfer at ``rate_mbit``, the rest of the wait is spent connected at tail power."""
    compute = power.busy_w(threads) * device_ms / 1e3
    wait = power.idle_w * wait_ms / 1e3
    if radio is None:
        return Energy(compute, wait, 0.0, 0.0)
    connected_ms = max(0.0, wait_ms - up_ms - down_ms)
    radio_j = radio.transfer_j(up_ms, down_ms, rate_mbit) + radio.tail_mw * connected_ms / 1e6
    return Energy(compute, wait, radio_j, radio.connection_j())


def citations() -> list[str]:
    """One line per source in energy.json: author, title, URL and how it was checked."""
    c = constants()
    sources = [b["source"] for b in c["boards"].values()] + [c["radios"]["source"]]
    return [f"{s['author']}, \"{s['title']}\", {s['url']} ({s['status']})" for s in sources]
