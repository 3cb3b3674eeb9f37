"""What this host's CPU is, as far as int8 kernels care: the instruction-set flags that change their results."""

from __future__ import annotations

import contextlib
import functools
import platform
from pathlib import Path
from typing import Any

# Flags that decide which int8 dot-product path a runtime takes on this CPU.
INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm")


@functools.cache
def host_flags() -> tuple[str, ...]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return tuple(f for f in INT8_FLAGS if f in flags)


def has_vnni() -> bool:
    return any(f in host_flags() for f in ("avx512_vnni", "avx_vnni"))


def describe_host() -> dict[str, object]:
    """{"machine", "int8_flags", "int8_dot"}: enough to say why host kernels differ from the reference."""
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        dot = "VNNI (int32 accumulation)" if has_vnni() else "VPMADDUBSW (int16 pair sums, saturating)"
    elif machine in ("aarch64", "arm64"):
        dot = "SDOT" if "asimddp" in host_flags() else "NEON widening multiply"
    else:
        dot = "unknown"
    return {"machine": machine, "int8_flags": list(host_flags()), "int8_dot": dot}


def isa_label() -> str:
    d = describe_host()
    flags = ",".join(d["int8_flags"]) or "no int8 flags"  # type: ignore[arg-type]
    return f"{d['machine']} ({flags})"


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """numpy's BLAS on one thread while the block runs. The products an export makes in numpy (a head's per-image
    reference kernels, the codec's least-squares fits) are too small to split, and idle BLAS threads spin on the
    cores the rest of the export needs: measured on a loaded 2-core host, 52 -> 31 ms CPU per R152 head image of
    the TFLite reference evaluator, and 7.9 -> 0.9 CPU s per codec table fit. A matrix product's every output
    element is summed the same way on any thread count (BLAS splits outputs, not sums): the same bytes."""
    ctl = _blas_controller()
    return contextlib.nullcontext() if ctl is None else ctl.limit(limits=1, user_api="blas")
