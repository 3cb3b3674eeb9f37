"""Emulated links: link profiles, a pair of network namespaces joined by a veth pair, and the analytic fallback.

The kernel shapes the rate (``tc``): ``netem`` (rate, delay, loss) where the kernel has it, else ``tbf`` (rate only)
on both ends of the veth pair; then the propagation delay is applied by the server side's relay
(:mod:`bottlefit.splitbench.relay`) in user space and the profile's loss is not applied. Every choice is recorded in
:class:`LinkSetup` and printed. Where namespaces cannot be made (not root, no ``ip``, a container without the
capability), :func:`open_links` says why and the bench uses the analytic model: latency = what loopback measured +
handshake RTT + RTT + bytes·8/rate per direction.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bottlefit.errors import UserError

NETNS_DIR = Path("/run/netns")
PREFIX = "bfbench"
DEV_ADDR, SRV_ADDR = "10.253.0.1", "10.253.0.2"


@dataclass(frozen=True)
class LinkProfile:
    name: str
    label: str
    rate_mbit: float  # each direction
    rtt_ms: float
    loss_pct: float  # each direction, applied only with netem

    def transfer_ms(self, nbytes: float) -> float:
        return nbytes * 8 / (self.rate_mbit * 1e3)


# Rates as the BottleFit paper's links; RTT and loss are typical figures for each technology (stated, not measured).
PROFILES: dict[str, LinkProfile] = {p.name: p for p in (
    LinkProfile("3g", "3G", 1.1, 150.0, 0.5),
    LinkProfile("lte", "LTE", 5.85, 60.0, 0.1),
    LinkProfile("wifi", "Wi-Fi", 18.88, 10.0, 0.05),
    LinkProfile("5g", "5G", 50.0, 20.0, 0.05),
)}


def parse_links(spec: str) -> list[LinkProfile]:
    """``"3g,lte"`` or ``"all"`` -> profiles, slowest first; one-line UserError naming the unknown one."""
    names = list(PROFILES) if spec.strip() == "all" else [s.strip().lower() for s in spec.split(",") if s.strip()]
    if not names:
        raise UserError("--links is empty: name one or more of " + ", ".join(PROFILES))
    for n in names:
        if n not in PROFILES:
            raise UserError(f"--links: unknown link profile {n!r}; known: {', '.join(PROFILES)} (or all)")
    return sorted({PROFILES[n] for n in names}, key=lambda p: p.rate_mbit)


@dataclass
class LinkSetup:
    """How the links are emulated in this run (goes into the report and the JSON)."""

    kind: str  # "netns" | "analytic"
    shaper: str = ""  # "netem" | "tbf" | ""
    delay: str = ""  # how the propagation delay is applied
    loss: str = ""  # whether loss is applied
    reason: str = ""  # why the analytic model (kind == "analytic")
    dev_ns: str = ""
    srv_ns: str = ""
    dev_if: str = ""
    srv_if: str = ""
    dev_addr: str = "127.0.0.1"
    srv_addr: str = "127.0.0.1"
    applied: dict[str, str] = field(default_factory=dict)  # profile -> the tc line applied

    @property
    def relay_delays(self) -> bool:
        """Whether the relay applies the propagation delay (netns without netem)."""
        return self.kind == "netns" and self.shaper != "netem"

    def describe(self) -> str:
        if self.kind == "analytic":
            return (f"analytic link model ({self.reason}): loopback round trip + handshake RTT + RTT + "
                    "bytes*8/rate per direction; loss not modelled")
        return (f"network namespaces {self.dev_ns} / {self.srv_ns} joined by veth {self.dev_if}-{self.srv_if}: "
                f"rate by {self.shaper} on both ends; delay {self.delay}; loss {self.loss}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {(p.stderr or p.stdout).strip().splitlines()[-1:] or p.returncode}")
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Namespaces a killed run of ours left behind (its pid in the name is gone): deleted, names returned."""
    gone: list[str] = []
    if not NETNS_DIR.is_dir():
        return gone
    for p in NETNS_DIR.iterdir():
        m = re.fullmatch(rf"{PREFIX}-(\d+)-[0-9a-f]+-(dev|srv)", p.name)
        if m and not _alive(int(m.group(1))):
            if _run(["ip", "netns", "del", p.name], check=False).returncode == 0:
                gone.append(p.name)
    return gone


def _tc_line(dev: str, profile: LinkProfile, netem: bool) -> list[str]:
    rate = f"{profile.rate_mbit * 1000:.0f}kbit"
    if netem:
        return ["qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{profile.rtt_ms / 2:g}ms", "rate", rate,
                "loss", f"{profile.loss_pct:g}%", "limit", "10000"]
    # burst: one full frame (a bucket smaller than a frame never sends it; a larger one lets more pass at line
    # rate); limit: a queue that holds a whole request, so the shaper delays rather than drops (loss is netem's)
    return ["qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", "1540", "limit", "1000000"]


class Namespaces:
    """Two namespaces, ``dev`` (the device side) and ``srv`` (the server side), joined by a veth pair."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.setup = LinkSetup("netns", dev_ns=f"{PREFIX}-{tag}-dev", srv_ns=f"{PREFIX}-{tag}-srv",
                               dev_if=f"bfd{tag[-6:]}", srv_if=f"bfs{tag[-6:]}", dev_addr=DEV_ADDR, srv_addr=SRV_ADDR)
        self.netem = False

    def create(self) -> None:
        s = self.setup
        _run(["ip", "netns", "add", s.dev_ns])
        _run(["ip", "netns", "add", s.srv_ns])
        _run(["ip", "link", "add", s.dev_if, "netns", s.dev_ns, "type", "veth", "peer", "name", s.srv_if,
              "netns", s.srv_ns])
        for ns, dev, addr in ((s.dev_ns, s.dev_if, DEV_ADDR), (s.srv_ns, s.srv_if, SRV_ADDR)):
            # no IPv6: its neighbour discovery would add bytes to the counters the bench reads
            _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{dev}.disable_ipv6=1"], check=False)
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # netem where the kernel has it (detected by trying), else tbf for the rate and the relay for the delay
        probe = _run(["tc", "-n", s.dev_ns, *_tc_line(s.dev_if, PROFILES["5g"], True)], check=False)
        self.netem = probe.returncode == 0
        s.shaper = "netem" if self.netem else "tbf"
        if self.netem:
            s.delay = "netem: RTT/2 on each end (the TCP handshake included)"
            s.loss = "applied by netem on each end"
        else:
            s.delay = ("no netem qdisc in this kernel: the server side's relay holds every chunk RTT/2 in each "
                       "direction, the request one more RTT (its TCP handshake), and each direction one frame's "
                       "serialization time more (tbf sends a burst's first frame at once); TCP slow start over "
                       "the RTT is not emulated")
            s.loss = "not applied (needs netem, which this kernel lacks)"

    def apply(self, profile: LinkProfile) -> None:
        s = self.setup
        for ns, dev in ((s.dev_ns, s.dev_if), (s.srv_ns, s.srv_if)):
            line = _tc_line(dev, profile, self.netem)
            _run(["tc", "-n", ns, *line])
            s.applied[profile.name] = "tc " + " ".join(line)

    def destroy(self) -> None:
        for ns in (self.setup.dev_ns, self.setup.srv_ns):
            if (NETNS_DIR / ns).exists():
                _run(["ip", "netns", "del", ns], check=False)

    def exec_prefix(self, side: str) -> list[str]:
        return ["ip", "netns", "exec", self.setup.dev_ns if side == "dev" else self.setup.srv_ns]


def namespaces_unavailable() -> str | None:
    """Why this machine cannot make namespaces for us, or None when it (probably) can."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "this OS has no network namespaces"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run as root for emulated links"
    return None


@contextmanager
def open_links(mode: str) -> Iterator[Namespaces | LinkSetup]:
    """``mode`` auto | netns | analytic. Yields a :class:`Namespaces` (created; always destroyed on the way out,
    exceptions and Ctrl-C included) or the analytic :class:`LinkSetup` with its reason."""
    reason = "asked for with --link-model analytic" if mode == "analytic" else namespaces_unavailable()
    ns: Namespaces | None = None
    if reason is None:
        remove_stale()
        ns = Namespaces()
        try:
            ns.create()
        except (OSError, subprocess.TimeoutExpired) as e:
            ns.destroy()
            ns, reason = None, f"could not create network namespaces: {e}"
    if ns is None:
        if mode == "netns":
            raise UserError(f"--link-model netns: {reason}")
        yield LinkSetup("analytic", reason=reason or "")
        return
    try:
        yield ns
    finally:
        ns.destroy()
