"""A Raspberry Pi's own Python, numpy, LiteRT, ONNX Runtime and ncnn on this host, under qemu arm64 user-mode emulation.

``ensure_sysroot()`` builds once (as root; 30–50 s, 435 MB) a Debian bookworm arm64 minbase holding python3.11,
plus the boards' aarch64 wheels (``WHEELS``) unzipped beside it, and caches it under ``cache_dir()/arm64-<key>/``.
``run_python()`` runs a script in it under ``qemu-aarch64-static`` with ``QEMU_CPU`` set to a board's core. There is
no chroot, binfmt or emulated kernel: qemu translates the guest's instructions, the guest's system calls go to this
host's kernel, and the guest's absolute paths are looked up under the ``-L`` prefix first, then on the host. So
``/usr``, ``/etc``, ``/tmp``, ``/root`` and ``/dev`` are the sysroot's, while a path the sysroot lacks (the script,
a bundle under ``/work`` or ``/home/...``) is the host's. The guest cannot exec other aarch64 programs unless the host
has qemu's binfmt handler registered.

Layout of ``cache_dir()/arm64-<key>/`` (built in a temporary folder beside it and renamed into place when complete,
under ``arm64-<key>.lock``, so a crashed build leaves nothing that looks finished and two processes build it once):

* ``root/``: the Debian tree; it has no ``/proc/cpuinfo`` of its own;
* ``site/``: the unzipped wheels, the guest's ``PYTHONPATH``;
* ``cores/<profile>-<hash>/``: one ``-L`` prefix per cpuinfo, see below;
* ``sysroot.json``: written last: what the sysroot holds (``Sysroot.describe()``).

/proc/cpuinfo: onnxruntime segfaults at import under qemu unless ``/proc/cpuinfo`` is an ARM one, and qemu 7.2 shows
the guest the host's unless the ``-L`` prefix holds one. Rewriting ``root/proc/cpuinfo`` before each run would let
two concurrent runs for different cores read each other's file, and a lock around it would serialise every emulated
run; so each core gets its own prefix instead: a folder of relative symlinks to ``root/``'s top-level entries except
``proc/``, plus its own ``proc/cpuinfo``. A prefix is named by the hash of its cpuinfo, made once (the boards in
``CORES`` at build time, any other ``Core`` on first use, by atomic rename) and never modified, so runs for different
cores share the sysroot and run in parallel without a lock.

qemu's cortex-a72 and cortex-a53 models have the crypto extensions the Pi 4/3/Zero 2 SoCs lack, so there the guest's
HWCAP (not its cpuinfo) shows aes pmull sha1 sha2; the NEON, fp16 and dot-product bits that select int8 kernels match
the boards (a76: atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp; a72/a53: none of them). The runtimes select
kernels by HWCAP (and by the cpuinfo CPU part for the core's tuning), never by the crypto bits. The cores' names,
CPU parts and Features lines are rows of the board table (``boards.json`` beside this module, read through
``bottlefit.emulation.devicetime.boards``), which the rpi profiles and the device-time model read too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bottlefit.errors import EnvironmentProblem, UserError
from bottlefit.files import user_cache_dir

QEMU = "qemu-aarch64-static"
INSTALL = "apt-get install qemu-user-static debootstrap"
SUITE = "bookworm"
INCLUDE: tuple[str, ...] = ("python3.11", "libstdc++6")
# aarch64 cp311 wheels; their imports (numpy, ai_edge_litert.interpreter, onnxruntime incl. InferenceSession.run,
# ncnn) need no other distribution under emulation, so their declared dependencies are not installed.
WHEELS: tuple[str, ...] = ("numpy==2.4.6", "ai-edge-litert==2.3.0", "onnxruntime==1.32.0", "ncnn==1.0.20250503")
# ai-edge-litert 2.3.0's aarch64 wheel is tagged manylinux_2_27 only: without that tag pip finds 1.4.0
PIP_PLATFORMS: tuple[str, ...] = ("manylinux_2_27_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64",
                                  "manylinux2014_aarch64")
BUILD_VERSION = 1  # bump when the recipe below changes in a way the key's other inputs do not show
MARKER = "sysroot.json"
STEP_TIMEOUT = 1800.0  # seconds for one build step (debootstrap and pip download fetch from the network)


class EmulationUnavailable(EnvironmentProblem):
    """qemu-user-static / debootstrap missing, or not root to build the sysroot: one line naming what to install
    (``apt-get install qemu-user-static debootstrap`` as root) or what to do."""


@dataclass(frozen=True)
class Core:
    """A board's CPU, as qemu names it, and the /proc/cpuinfo the board shows."""

    profile: str  # "pi4"
    cpu: str  # "cortex-a72" (QEMU_CPU value)
    board: str  # "Raspberry Pi 4"
    cpuinfo_part: str  # "0xd08"
    features: str  # the board's /proc/cpuinfo "Features" line
    processors: int = 4  # the board's cores

    def cpuinfo(self) -> str:
        """The board's /proc/cpuinfo (the fields ARM's Linux kernel writes that CPU feature detection reads)."""
        block = ("processor\t: {n}\nFeatures\t: {f}\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
                 "CPU part\t: {p}\n\n")
        return "".join(block.format(n=n, f=self.features, p=self.cpuinfo_part) for n in range(self.processors)) + \
            f"Model\t\t: {self.board}\n"


def _cores() -> dict[str, Core]:
    """The boards bottlefit emulates, from the one board table (devicetime's boards.json)."""
    from bottlefit.emulation.devicetime import boards

    return {b.profile: Core(b.profile, b.core, b.short_name, b.cpu_part, " ".join(b.features), b.cores)
            for b in boards() if b.profile}


CORES: dict[str, Core] = _cores()


def get_core(profile: str) -> Core:
    """The core of board ``profile`` ("pi4", "pi5", "pi3", "zero2")."""
    try:
        return CORES[profile]
    except KeyError:
        raise UserError(f"unknown board profile {profile!r}: known profiles are {', '.join(CORES)}") from None


@dataclass(frozen=True)
class Sysroot:
    """A finished arm64 sysroot in the cache."""

    root: Path  # Debian bookworm arm64 minbase with python3.11 + libstdc++6
    site: Path  # unzipped aarch64 wheels (the guest's PYTHONPATH)
    key: str  # content key the cache folder is named by

    def python(self) -> Path:
        return self.root / "usr" / "bin" / "python3.11"

    def describe(self) -> dict[str, Any]:
        """{"debian", "python", "wheels" (the wheel files unzipped into site), "qemu" (its --version), "key"}."""
        meta = json.loads((self.root.parent / MARKER).read_text())
        return {"debian": meta["debian"], "python": meta["python"], "wheels": meta["wheels"],
                "qemu": qemu_version(), "key": self.key}


def sysroot_key(suite: str, include: Sequence[str], wheels: Sequence[str], version: int | str) -> str:
    """Content key of a sysroot: the sha256 prefix of everything that defines what it holds."""
    text = json.dumps({"suite": suite, "include": list(include), "wheels": list(wheels), "version": str(version)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """$BOTTLEFIT_CACHE, else $XDG_CACHE_HOME/bottlefit, else ~/.cache/bottlefit."""
    return user_cache_dir()


def qemu_path() -> str:
    """qemu-aarch64-static on PATH, or EmulationUnavailable naming the package."""
    path = shutil.which(QEMU)
    if path is None:
        raise EmulationUnavailable(f"{QEMU} is not on PATH: install it with `{INSTALL}` as root")
    return path


def qemu_version() -> str:
    """The first line of ``qemu-aarch64-static --version``."""
    proc = _step("qemu --version", [qemu_path(), "--version"], "reinstall qemu-user-static", timeout=60)
    return proc.stdout.partition("\n")[0].strip()


def ensure_sysroot(log: Callable[[str], None] = lambda m: None) -> Sysroot:
    """The cached arm64 sysroot, built first if missing (needs root, debootstrap and the network; 30–50 s)."""
    qemu_path()
    key = sysroot_key(SUITE, INCLUDE, WHEELS, BUILD_VERSION)
    cache = cache_dir()
    final = cache / f"arm64-{key}"
    if (final / MARKER).is_file():
        return _sysroot(final, key)
    if os.geteuid() != 0:
        raise EmulationUnavailable(f"no arm64 sysroot cached in {final}, and building one needs root (debootstrap): "
                                   "run this once as root, or point BOTTLEFIT_CACHE at a cache that holds one")
    for tool, package in (("debootstrap", "debootstrap"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            raise EmulationUnavailable(f"{tool} is not on PATH: install it with `apt-get install {package}` as root "
                                       f"(`{INSTALL}`)")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EmulationUnavailable(f"cannot create the cache folder {cache} ({e.strerror}): set BOTTLEFIT_CACHE "
                                   "to a writable folder") from None
    with _locked(cache / f"arm64-{key}.lock", log):
        if (final / MARKER).is_file():  # another process built it while we waited
            return _sysroot(final, key)
        for stale in cache.glob(f".arm64-{key}.building-*"):  # left by a crashed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # unfinished (no marker): not ours to trust
            shutil.rmtree(final)
        building = Path(tempfile.mkdtemp(prefix=f".arm64-{key}.building-", dir=cache))
        try:
            _build(building, key, log)
            os.chmod(building, 0o755)
            os.replace(building, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return _sysroot(final, key)


def core_root(sysroot: Sysroot, core: Core) -> Path:
    """The ``-L`` prefix for ``core``: the sysroot seen through symlinks, with that core's /proc/cpuinfo."""
    text = core.cpuinfo()
    cores = sysroot.root.parent / "cores"
    view = cores / f"{core.profile}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if (view / "proc" / "cpuinfo").is_file():
        return view
    cores.mkdir(exist_ok=True)
    making = Path(tempfile.mkdtemp(prefix=".making-", dir=cores))
    try:
        for entry in sorted(sysroot.root.iterdir()):
            if entry.name != "proc":
                (making / entry.name).symlink_to(os.path.relpath(entry, view))  # same depth as `making`
        (making / "proc").mkdir()
        (making / "proc" / "cpuinfo").write_text(text)
        os.chmod(making, 0o755)
        try:
            os.rename(making, view)
        except OSError:
            if not (view / "proc" / "cpuinfo").is_file():
                raise
            shutil.rmtree(making)  # another process made the same view first
    except BaseException:
        shutil.rmtree(making, ignore_errors=True)
        raise
    return view


def run_python(sysroot: Sysroot, core: Core, script: Path, args: Sequence[str] = (), *, cwd: Path | None = None,
               timeout: float = 600, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with the guest's python3.11 on ``core`` and return the finished process (output captured as
    text; a non-zero exit is returned, not raised). ``env`` adds to / overrides the guest's minimal environment
    (PATH, HOME, LANG=C.UTF-8, PYTHONPATH=site, PYTHONNOUSERSITE, PYTHONDONTWRITEBYTECODE, QEMU_CPU).
    EmulationUnavailable only when qemu itself cannot start; subprocess.TimeoutExpired after ``timeout`` s."""
    # absolute: a relative script path would be read again relative to ``cwd``
    return _run_guest(sysroot, core, [str(Path(script).resolve()), *map(str, args)], cwd=cwd, timeout=timeout,
                      env=env)


def guest_machine(sysroot: Sysroot, core: Core) -> str:
    """``platform.machine()`` inside the guest: "aarch64"."""
    proc = _run_guest(sysroot, core, ["-c", "import platform; print(platform.machine())"], timeout=120)
    if proc.returncode != 0:
        raise UserError(f"the arm64 guest python failed on {core.cpu} (exit {proc.returncode}): "
                        f"{last_line(proc.stderr)}")
    return proc.stdout.strip()


def _run_guest(sysroot: Sysroot, core: Core, argv: Sequence[str], *, cwd: Path | None = None, timeout: float = 600,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    qemu = qemu_path()
    cmd = [qemu, "-L", str(core_root(sysroot, core)), str(sysroot.python()), "-X", "utf8", *argv]
    guest_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), "LANG": "C.UTF-8",
                 "QEMU_CPU": core.cpu, "PYTHONPATH": str(sysroot.site), "PYTHONNOUSERSITE": "1",
                 "PYTHONDONTWRITEBYTECODE": "1"}
    guest_env.update(env or {})
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=guest_env, capture_output=True, text=True, errors="replace",
                              timeout=timeout)
    except OSError as e:
        raise EmulationUnavailable(f"{qemu} could not start ({e.strerror or e}): reinstall it with `{INSTALL}`") \
            from None
    first = proc.stderr.partition("\n")[0].strip()
    # qemu's own errors (no ELF loader under the prefix, unknown QEMU_CPU, ...) start with its program name
    if proc.returncode != 0 and not proc.stdout and first.startswith(f"{os.path.basename(qemu)}: "):
        raise EmulationUnavailable(f"qemu could not start the arm64 python on {core.cpu}: {first}")
    return proc


def _sysroot(folder: Path, key: str) -> Sysroot:
    return Sysroot(root=folder / "root", site=folder / "site", key=key)


def _build(folder: Path, key: str, log: Callable[[str], None]) -> None:
    """Build the sysroot's contents into ``folder`` (root/, site/, cores/, sysroot.json last)."""
    start = time.monotonic()
    root, site, wheels = folder / "root", folder / "site", folder / "wheels"
    log(f"arm64 sysroot: debootstrap {SUITE} arm64 minbase with {', '.join(INCLUDE)} (about 30 s)")
    _step("debootstrap", ["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
                          f"--include={','.join(INCLUDE)}", SUITE, str(root)],
          "check that the Debian archive (deb.debian.org) is reachable and the disk has 500 MB free")
    debs = sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    if not debs:
        raise EmulationUnavailable(f"arm64 sysroot: debootstrap left no .deb in {root}/var/cache/apt/archives: "
                                   f"rerun, or check debootstrap's log in {root}/debootstrap")
    log(f"arm64 sysroot: unpacking {len(debs)} packages")
    for deb in debs:
        _step(f"dpkg-deb -x {deb.name}", ["dpkg-deb", "-x", str(deb), str(root)], "check the disk space and rerun")
    for deb in debs:
        deb.unlink()
    if not (root / "usr" / "bin" / "python3.11").is_file():
        raise EmulationUnavailable(f"arm64 sysroot: no usr/bin/python3.11 in {root} after unpacking: bump "
                                   "BUILD_VERSION's recipe (bottlefit/emulation/arm64.py)")
    log(f"arm64 sysroot: pip download {' '.join(WHEELS)} (aarch64, cp311)")
    files = _unzip_wheels(WHEELS, wheels, site)
    sysroot = _sysroot(folder, key)
    for core in CORES.values():
        core_root(sysroot, core)
    _precompile(sysroot, log)
    meta = {"debian": SUITE, "python": "3.11", "wheels": [f.name for f in files], "key": key, "include": list(INCLUDE),
            "pins": list(WHEELS), "build_version": BUILD_VERSION, "build_seconds": round(time.monotonic() - start, 1)}
    (folder / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    log(f"arm64 sysroot: ready in {meta['build_seconds']} s")


def _unzip_wheels(pins: Sequence[str], wheels: Path, site: Path) -> list[Path]:
    """pip download the aarch64 cp311 wheels of ``pins`` (no dependencies) into ``wheels``, unzip them into ``site``
    (created), delete ``wheels``; the wheel files, sorted."""
    platforms = [arg for platform in PIP_PLATFORMS for arg in ("--platform", platform)]
    _step("pip download", [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *platforms,
                           "--python-version", "311", "--implementation", "cp", "--disable-pip-version-check",
                           "--no-input", "-d", str(wheels), *pins],
          "check that PyPI is reachable and these versions have aarch64 cp311 wheels")
    files = sorted(wheels.glob("*.whl"))
    if len(files) != len(pins):
        raise EmulationUnavailable(f"arm64 wheels: pip download gave {len(files)} wheels for {len(pins)} pins "
                                   f"({', '.join(f.name for f in files)}): check the pins")
    site.mkdir()
    for wheel in files:
        try:
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(site)
        except (zipfile.BadZipFile, OSError) as e:
            raise EmulationUnavailable(f"arm64 wheels: unzipping {wheel.name} failed ({e}): rerun") from None
    shutil.rmtree(wheels)
    return files


def _precompile(sysroot: Sysroot, log: Callable[[str], None]) -> None:
    """Check that the guest python starts, then byte-compile its stdlib and the wheels once: the .debs were unpacked
    without their postinst (which would have run py3compile) and wheels ship no .pyc, and the guest runs with
    PYTHONDONTWRITEBYTECODE, so without this every run recompiles numpy and the stdlib under emulation (an import of
    onnxruntime takes ~4.5 s instead of ~2 s). Compiled by this host's python when its bytecode magic number is the
    guest's (3.11.x: about 3 s), else by the guest python (about 25 s)."""
    probe = "import importlib.util, platform; print(platform.machine(), importlib.util.MAGIC_NUMBER.hex())"
    proc = _run_guest(sysroot, CORES["pi4"], ["-c", probe], timeout=120)
    machine, _, magic = proc.stdout.strip().partition(" ")
    if proc.returncode != 0 or machine != "aarch64":
        raise EmulationUnavailable(f"arm64 sysroot: the guest python does not run (exit {proc.returncode}, machine "
                                   f"{machine!r}: {last_line(proc.stderr)}): rerun, or bump BUILD_VERSION's recipe")
    targets = [str(sysroot.root / "usr" / "lib" / "python3.11"), str(sysroot.site)]
    log("arm64 sysroot: byte-compiling the guest's stdlib and wheels")
    if magic == importlib.util.MAGIC_NUMBER.hex():
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0", *targets], capture_output=True,
                       timeout=STEP_TIMEOUT)
    else:
        _run_guest(sysroot, CORES["pi4"], ["-m", "compileall", "-q", "-j0", *targets], timeout=STEP_TIMEOUT)
    # the exit status is not checked: a file that does not compile is compiled (and fails) at import as before


def _step(name: str, cmd: Sequence[str], fix: str, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run one build step quietly; EmulationUnavailable naming the step, its last error line and the fix."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, errors="replace", timeout=timeout)
    except FileNotFoundError:
        raise EmulationUnavailable(f"arm64 sysroot: {name}: {cmd[0]} not found: `{INSTALL}` as root") from None
    except subprocess.TimeoutExpired:
        raise EmulationUnavailable(f"arm64 sysroot: {name} took over {timeout:.0f} s: {fix}") from None
    if proc.returncode != 0:
        raise EmulationUnavailable(f"arm64 sysroot: {name} failed (exit {proc.returncode}: "
                                   f"{last_line(proc.stderr) or last_line(proc.stdout)}): {fix}")
    return proc


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@contextlib.contextmanager
def _locked(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    """An exclusive flock on ``path`` (released when the process dies, so a crash leaves no stale lock)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"arm64 sysroot: waiting for another process building it ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def start_python(sysroot: Sysroot, core: Core, script: Path, args: Sequence[str] = (), *, cwd: Path | None = None,
                 env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """:func:`run_python` started, not waited for: the guest runs beside the caller's own work (or beside other
    guests) until :func:`finish_python` collects it. EmulationUnavailable when qemu cannot be started at all."""
    qemu = qemu_path()
    cmd = [qemu, "-L", str(core_root(sysroot, core)), str(sysroot.python()), "-X", "utf8", str(Path(script).resolve()),
           *map(str, args)]
    guest_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), "LANG": "C.UTF-8",
                 "QEMU_CPU": core.cpu, "PYTHONPATH": str(sysroot.site), "PYTHONNOUSERSITE": "1",
                 "PYTHONDONTWRITEBYTECODE": "1"}
    guest_env.update(env or {})
    try:
        return subprocess.Popen(cmd, cwd=cwd, env=guest_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace")
    except OSError as e:
        raise EmulationUnavailable(f"{qemu} could not start ({e.strerror or e}): reinstall it with `{INSTALL}`") \
            from None


def finish_python(proc: subprocess.Popen[str], core: Core, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Wait for a guest :func:`start_python` started, as :func:`run_python` returns it (a non-zero exit is
    returned; qemu's own start-up errors raise EmulationUnavailable); subprocess.TimeoutExpired after ``timeout``
    s, with the guest killed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    first = err.partition("\n")[0].strip()
    if proc.returncode != 0 and not out and first.startswith(f"{os.path.basename(QEMU)}: "):
        raise EmulationUnavailable(f"qemu could not start the arm64 python on {core.cpu}: {first}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
