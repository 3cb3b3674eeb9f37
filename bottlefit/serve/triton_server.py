"""A real NVIDIA Triton Inference Server on this CPU, for trying a repository and for the tests and benchmarks.

The ``nvidia-pytriton`` wheel bundles ``tritonserver`` (2.51 in 0.7.0) with the python backend and its stubs for
Python 3.8-3.13. It is fetched once into the user cache with pip and unpacked there (not installed: its Python
package pins numpy<2). Its python backend needs numpy<2 in the Python that runs the models (with numpy 2 its stub
answers empty outputs), so the models run in their own virtual environment, also built once in the cache:
numpy 1.26.4 and this host's versions of onnxruntime, constriction and zstandard. The server starts with that
environment first on PATH (the stub's embedded Python finds its prefix from ``python3`` on PATH) and this Python's
libpython on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bottlefit.errors import EnvironmentProblem
from bottlefit.files import user_cache_dir

PYTRITON = "nvidia-pytriton==0.7.0"
ENV_NUMPY = "numpy==1.26.4"  # the python backend's stub returns empty outputs with numpy 2
ENV_PACKAGES = ("onnxruntime", "constriction", "zstandard")  # at this host's versions: the same decoder and tail
MARKER = ".complete"


class TritonUnavailable(EnvironmentProblem):
    """No Triton server can be had here (no network for the wheel, no shared libpython, ...)."""


@dataclass(frozen=True)
class TritonInstall:
    root: Path  # the unpacked wheel
    env: Path  # the models' virtual environment

    @property
    def binary(self) -> Path:
        return self.root / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "backends"

    def environ(self) -> dict[str, str]:
        """The server's environment: the models' venv first on PATH, the wheel's libraries and libpython."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.env / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        env["VIRTUAL_ENV"] = str(self.env)
        libs = [str(self.root / "nvidia_pytriton.libs"), str(sysconfig.get_config_var("LIBDIR") or "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).strip(":")
        return env


def _pip(args: list[str], what: str, timeout: int = 900) -> None:
    try:
        cp = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TritonUnavailable(f"{what}: pip took over {timeout} s") from None
    if cp.returncode != 0:
        tail = (cp.stderr or cp.stdout).strip().splitlines()[-1:] or [""]
        raise TritonUnavailable(f"{what} failed (no network to the package index?): {tail[0]}")


def _build_once(final: Path, build) -> Path:
    """``build(tmp)`` into a temporary folder beside ``final``, then renamed into place, under a lock file (two
    test runs on one cache build it once; a crash leaves no half-built folder)."""
    import fcntl

    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MARKER).is_file():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
        try:
            build(tmp)
            (tmp / MARKER).write_text("ok\n")
            if final.exists():  # unfinished (no marker): not ours to trust
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def ensure_server(log=lambda m: None) -> TritonInstall:
    """The unpacked ``tritonserver`` and the models' environment in the user cache, fetched and built if missing
    (pip and the package index; about a minute the first time)."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    libdir = Path(str(sysconfig.get_config_var("LIBDIR") or ""))
    if not (libdir / f"libpython{py}.so.1.0").is_file() and not Path(f"/lib/x86_64-linux-gnu/libpython{py}.so.1.0"
                                                                      ).is_file():
        raise TritonUnavailable(f"no shared libpython{py} here: the python backend's stub embeds it")
    cache = user_cache_dir()
    wheel_key = hashlib.sha256(f"{PYTRITON}|{py}".encode()).hexdigest()[:12]

    def unpack(tmp: Path) -> None:
        log(f"fetching {PYTRITON} (55 MB) into {cache}")
        _pip([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", PYTRITON,
              "-d", str(tmp / "wheel")], f"pip download {PYTRITON}")
        wheel = next((tmp / "wheel").glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        wheel.unlink()
        stub = tmp / "pytriton" / "tritonserver" / "python_backend_stubs" / py / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonUnavailable(f"{PYTRITON} has no python backend stub for Python {py}")
        backend = tmp / "backends" / "python"
        shutil.copytree(tmp / "pytriton" / "tritonserver" / "backends" / "python", backend)
        shutil.copy2(stub, backend / stub.name)
        for f in (tmp / "pytriton" / "tritonserver" / "bin" / "tritonserver", backend / stub.name):
            f.chmod(0o755)

    pins = [ENV_NUMPY, *(f"{p}=={metadata.version(p)}" for p in ENV_PACKAGES)]
    env_key = hashlib.sha256(json.dumps([py, pins]).encode()).hexdigest()[:12]

    def venv(tmp: Path) -> None:
        log(f"building the Triton models' Python environment ({', '.join(pins)}) in {cache}")
        _pip([sys.executable, "-m", "venv", "--without-pip", str(tmp)], "python -m venv")
        _pip([sys.executable, "-m", "pip", "--python", str(tmp / "bin" / "python"), "install", "-q",
              "--only-binary=:all:", *pins], f"pip install {' '.join(pins)}")

    root = _build_once(cache / f"triton-{wheel_key}", unpack)
    env = _build_once(cache / f"triton-env-{env_key}", venv)
    return TritonInstall(root, env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TritonServer:
    """``tritonserver`` on loopback ports against ``repo``; started by :meth:`start`, stopped by its PID."""

    def __init__(self, install: TritonInstall, repo: Path, log_file: Path) -> None:
        self.install, self.repo, self.log_file = install, Path(repo), Path(log_file)
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        return [str(self.install.binary), f"--model-repository={self.repo}",
                f"--backend-directory={self.install.backends}", f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}", "--http-address=127.0.0.1",
                "--grpc-address=127.0.0.1", "--exit-on-error=true", "--strict-readiness=true",
                "--exit-timeout-secs=10"]

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        with open(self.log_file, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env=self.install.environ(), start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TritonUnavailable(f"tritonserver exited with {self.proc.returncode} while loading {self.repo}: "
                                        f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TritonUnavailable(f"tritonserver not ready after {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
