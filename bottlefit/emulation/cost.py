"""A board's cost without the board: guest instructions retired per inference under qemu arm64 user-mode emulation.

A proxy for the board's time, not cycles: it counts what the Pi's own kernels execute on the Pi's instruction set
(the NEON / dot-product paths the runtimes pick for the emulated core), nearly deterministically, so CI can track
it. ``instructions_per_inference()`` runs a small guest script that loads one head artifact in its runtime (LiteRT
with XNNPACK on or off, or ONNX Runtime), one warm-up inference, then ``runs`` counted ones between two markers
(``close(MARK_FD)``, which the plugin records); the span divided by ``runs`` is the cost of one inference. Counting
between markers, not the difference of two whole processes, keeps start-up, imports and model loading out: their
count usually varies by a few thousand instructions from process to process, but once in CI by 0.8 M, more than a
small model's inference. ``ort_config`` passes ONNX Runtime session config entries to the
guest session, so a board profile's kernel choice (bottlefit.targets.rpi.profiles.ORT_CONFIG) is what gets counted;
``regressions()`` compares a run with a baseline for CI (bench/bench_pi_cost.py --check).

Counting needs ``qemu-aarch64`` from the package qemu-user (the -static build cannot load plugins) and a TCG plugin
(``plugin/insn_count.c``) built here against ``include/qemu/qemu-plugin.h`` of the installed qemu's Debian source
package, fetched with ``apt-get source --download-only`` through a private apt directory (deb-src lines of its own;
the machine's apt configuration is not touched). Cached under ``cache_dir()``:

* ``qemu-plugin-h/<source version>/qemu-plugin.h``: the header (one download of ~24 MB per qemu version);
* ``insn-plugin-<key>/insn_count.so``: the plugin, keyed by the C source, the header, the compiler and glib's flags;
* ``cost-guest-<key>.py``: the guest script, keyed by its text.

Every missing tool is one EmulationUnavailable line naming the package to install.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import statistics
import subprocess
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bottlefit.emulation.arm64 import Core, EmulationUnavailable, Sysroot, cache_dir, core_root

QEMU_PLUGIN_CAPABLE = "qemu-aarch64"
QEMU_PACKAGE = "qemu-user"
PLUGIN_SOURCE = Path(__file__).parent / "plugin" / "insn_count.c"
HEADER = "qemu-plugin.h"
DEBIAN_ARCHIVE = ("deb-src http://deb.debian.org/debian {suite} main\n"
                  "deb-src http://deb.debian.org/debian {suite}-updates main\n"
                  "deb-src http://deb.debian.org/debian-security {suite}-security main\n")
STEP_TIMEOUT = 900.0
RUNTIMES = ("litert", "onnxruntime", "ncnn")
# The guest marks a span with close(MARK_FD): a descriptor no process has, so the call only fails with EBADF; the
# plugin is compiled with the same value (-DMARK_FD).
MARK_FD = 0x3B0771E5

# The guest side: load one head in its runtime, one warm-up inference, then RUNS more between two marks. Standard
# library + numpy + the runtime's wheel only; inputs are seeded random data of the model's own dtype and shape.
GUEST = '''\
import os
import sys

import numpy as np

model, runtime, xnnpack, threads, runs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), \\
    int(sys.argv[5])
# ONNX Runtime session config entries, "key=value" (e.g. session.qdqisint8allowed=0)
config = dict(a.split("=", 1) for a in sys.argv[6:])
rng = np.random.default_rng(0)


def data(shape, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max + 1, size=shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


if runtime == "litert":
    from ai_edge_litert import interpreter as tfl

    kw = {} if xnnpack else {"experimental_op_resolver_type": tfl.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    interp = tfl.Interpreter(model_path=model, num_threads=threads, **kw)
    interp.allocate_tensors()
    d = interp.get_input_details()[0]
    interp.set_tensor(d["index"], data(d["shape"], d["dtype"]))
    step = interp.invoke
elif runtime == "onnxruntime":
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads, o.log_severity_level = threads, 1, 3
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for k, v in config.items():
        o.add_session_config_entry(k, v)
    sess = ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])
    i = sess.get_inputs()[0]
    dtype = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}[i.type]
    feed = {i.name: data([int(s) if isinstance(s, int) else 1 for s in i.shape], dtype)}

    def step():
        sess.run(None, feed)
elif runtime == "ncnn":
    import ncnn

    # an ncnn model is NAME.param (text: layers, blobs "in0" -> "out0") + NAME.bin (weights)
    net = ncnn.Net()
    net.opt.num_threads = threads
    net.opt.use_int8_inference = True
    # float32 semantics: ncnn's fp16 storage and arithmetic (on by default where the core has them, the A76)
    # would change the numerics the head was verified with
    net.opt.use_fp16_packed = net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
    net.load_param(model)
    net.load_model(model[: -len(".param")] + ".bin")
    line = next(ln for ln in open(model) if ln.startswith("Input"))
    kv = dict(t.split("=", 1) for t in line.split() if "=" in t)
    x = data((int(kv["2"]), int(kv["1"]), int(kv["0"])), "float32")

    def step():
        ex = net.create_extractor()
        ex.input("in0", ncnn.Mat(x))
        ex.extract("out0")



def mark():
    try:
        os.close(@MARK_FD@)
    except OSError:
        pass


step()
mark()
for _ in range(runs):
    step()
mark()
print("ok", runs)
'''.replace("@MARK_FD@", str(MARK_FD))


@dataclass(frozen=True)
class Plugin:
    """The built counting plugin and the qemu that loads it."""

    so: Path
    qemu: str  # path of qemu-aarch64 (qemu-user)
    qemu_source_version: str  # Debian source version of the qemu the header came from


def qemu_plugin_path() -> str:
    """qemu-aarch64 (qemu-user) on PATH, or EmulationUnavailable naming the package."""
    path = shutil.which(QEMU_PLUGIN_CAPABLE)
    if path is None:
        raise EmulationUnavailable(f"{QEMU_PLUGIN_CAPABLE} is not on PATH: install it with `apt-get install "
                                   f"{QEMU_PACKAGE}` as root (qemu-aarch64-static cannot load the counting plugin)")
    return path


def qemu_source_version() -> str:
    """Debian source version of the installed qemu-user ("1:7.2+dfsg-7+deb12u18")."""
    if shutil.which("dpkg-query") is None:
        raise EmulationUnavailable("dpkg-query is not on PATH: the counting plugin is built against Debian's qemu "
                                   "source package, so it needs a Debian/Ubuntu host with qemu-user installed by apt")
    proc = subprocess.run(["dpkg-query", "-W", "-f=${source:Package} ${source:Version}", QEMU_PACKAGE],
                          capture_output=True, text=True)
    name, _, version = proc.stdout.strip().partition(" ")
    if proc.returncode != 0 or not version:
        raise EmulationUnavailable(f"{QEMU_PACKAGE} is not installed by apt: `apt-get install {QEMU_PACKAGE}` as "
                                   "root")
    return version


def ensure_plugin() -> Plugin:
    """The instruction-counting plugin, built once per (C source, qemu version, compiler, glib flags)."""
    qemu = qemu_plugin_path()
    version = qemu_source_version()
    for tool, package in (("gcc", "gcc"), ("pkg-config", "pkg-config")):
        if shutil.which(tool) is None:
            raise EmulationUnavailable(f"{tool} is not on PATH (needed to build the counting plugin): install it "
                                       f"with `apt-get install {package}` as root")
    glib = subprocess.run(["pkg-config", "--cflags", "glib-2.0"], capture_output=True, text=True)
    if glib.returncode != 0:
        raise EmulationUnavailable("glib-2.0's headers are missing (qemu-plugin.h includes glib.h): install them "
                                   "with `apt-get install libglib2.0-dev` as root")
    header = ensure_header(version)
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.partition("\n")[0]
    source = PLUGIN_SOURCE.read_bytes()
    define = f"-DMARK_FD={MARK_FD}"
    key = hashlib.sha256(b"\0".join([source, header.read_bytes(), gcc.encode(), glib.stdout.encode(),
                                      define.encode()])).hexdigest()
    folder = cache_dir() / f"insn-plugin-{key[:16]}"
    so = folder / "insn_count.so"
    if so.is_file():
        return Plugin(so, qemu, version)
    cache_dir().mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".insn-plugin.building-", dir=cache_dir()))
    try:
        _step("gcc (counting plugin)", ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-I", str(header.parent),
                                        define, *glib.stdout.split(), "-o", str(building / "insn_count.so"),
                                        str(PLUGIN_SOURCE)], "check gcc and libglib2.0-dev")
        os.chmod(building, 0o755)
        try:
            os.rename(building, folder)
        except OSError:
            if not so.is_file():
                raise
            shutil.rmtree(building)  # another process built the same plugin first
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return Plugin(so, qemu, version)


def ensure_header(version: str) -> Path:
    """``include/qemu/qemu-plugin.h`` of Debian's qemu source ``version``, cached; fetched with apt-get source
    through a private apt directory (its own sources.list with deb-src lines, lists and cache)."""
    final = cache_dir() / "qemu-plugin-h" / version.replace(":", "_") / HEADER
    if final.is_file():
        return final
    for tool, package in (("apt-get", "apt"), ("tar", "tar"), ("xz", "xz-utils")):
        if shutil.which(tool) is None:
            raise EmulationUnavailable(f"{tool} is not on PATH (needed to fetch qemu's {HEADER} from Debian's "
                                       f"source package): install `{package}`, or use a Debian/Ubuntu host")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qemu-src-", dir=final.parent) as tmp_name:
        tmp = Path(tmp_name)
        apt = tmp / "apt"
        for sub in ("lists/partial", "cache/archives/partial"):
            (apt / sub).mkdir(parents=True)
        (apt / "sources.list").write_text(DEBIAN_ARCHIVE.format(suite=_debian_suite()))
        opts = ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/nonexistent",
                "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
                "-o", "APT::Sandbox::User=root" if os.geteuid() == 0 else "Debug::NoLocking=1", "-q"]
        _step("apt-get update (deb-src, private)", ["apt-get", *opts, "update"],
              "check that deb.debian.org is reachable")
        src = tmp / "src"
        src.mkdir()
        _step(f"apt-get source qemu={version}", ["apt-get", *opts, "source", "--download-only", f"qemu={version}"],
              "check that this qemu version is still in Debian's archive (or upgrade qemu-user)", cwd=src)
        origs = sorted(src.glob("qemu_*.orig.tar.*"))
        debs = sorted(src.glob("qemu_*.debian.tar.*"))
        if not origs:
            raise EmulationUnavailable(f"apt-get source qemu={version} gave no .orig tarball in {src}")
        for deb in debs:  # a Debian patch to the plugin API would make the orig header the wrong one
            with tarfile.open(deb) as tf:
                for m in tf.getmembers():
                    f = tf.extractfile(m) if m.isfile() and "/patches/" in m.name else None
                    if f is not None and re.search(rb"^\+\+\+ \S*include/qemu/qemu-plugin\.h", f.read(), re.M):
                        raise EmulationUnavailable(f"Debian's qemu {version} patches {HEADER} ({m.name}): "
                                                   "bottlefit.emulation.cost takes it from the orig tarball only")
        _step(f"tar (extract {HEADER})", ["tar", "-xf", str(origs[0]), "-C", str(src), "--wildcards",
                                          f"*/include/qemu/{HEADER}"], "rerun; the download may be truncated")
        found = sorted(src.glob(f"*/include/qemu/{HEADER}"))
        if not found:
            raise EmulationUnavailable(f"no include/qemu/{HEADER} in {origs[0].name}: qemu {version} predates TCG "
                                       "plugins (qemu >= 4.2 has them)")
        shutil.copyfile(found[0], tmp / HEADER)
        os.replace(tmp / HEADER, final)
    return final


def guest_script() -> Path:
    """The guest script, written once into the cache (named by its hash)."""
    path = cache_dir() / f"cost-guest-{hashlib.sha256(GUEST.encode()).hexdigest()[:12]}.py"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cost-guest-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(GUEST)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Count:
    """One guest process's count: all it retired, and the running count at each mark the guest set."""

    total: int
    marks: tuple[int, ...]


def count_instructions(sysroot: Sysroot, core: Core, model: Path, runtime: str, *, xnnpack: bool = True,
                       threads: int = 1, runs: int = 0, plugin: Plugin | None = None, timeout: float = 900,
                       ort_config: Mapping[str, str] | None = None) -> Count:
    """Guest instructions of one guest process: start, load ``model``, one warm-up inference, a mark, ``runs``
    inferences, a mark, exit. ``ort_config``: ONNX Runtime session config entries (the board profile's, e.g. the
    kernels' activation type)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
    return _run_counted(plugin or ensure_plugin(), sysroot, core, guest_script(),
                        [str(Path(model).resolve()), runtime, "1" if xnnpack else "0", str(threads), str(runs),
                         *(f"{k}={v}" for k, v in sorted((ort_config or {}).items()))],
                        threads=threads, extra_site=(), timeout=timeout, name=f"{Path(model).name} ({runtime})")


def instructions_per_inference(sysroot: Sysroot, core: Core, model: Path, runtime: str, *, xnnpack: bool = True,
                               threads: int = 1, runs: int = 10, repeats: int = 1,
                               ort_config: Mapping[str, str] | None = None) -> float:
    """Guest instructions of one inference of ``model`` on ``core``: the count between the marks around ``runs``
    inferences (after one warm-up) divided by ``runs``; with ``repeats`` > 1, the median over that many processes."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    plugin = ensure_plugin()
    values = []
    for _ in range(max(1, repeats)):
        c = count_instructions(sysroot, core, model, runtime, xnnpack=xnnpack, threads=threads, runs=runs,
                               plugin=plugin, ort_config=ort_config)
        if len(c.marks) != 2:
            raise EmulationUnavailable(f"the counting plugin recorded {len(c.marks)} marks, not 2, for "
                                       f"{Path(model).name}: is {plugin.so} built from this bottlefit's plugin source?")
        values.append((c.marks[1] - c.marks[0]) / runs)
    return float(statistics.median(values))


def regressions(baseline: Mapping[str, Mapping[str, float]], measured: Mapping[str, Mapping[str, float]],
                margin: float) -> list[str]:
    """One line per cost in ``measured`` ({profile: {artifact/delegate: M instructions}}) above its ``baseline``
    value by more than ``margin`` (0.10 = 10%); costs the baseline lacks are new, not regressions."""
    out = []
    for prof, costs in measured.items():
        for key, value in costs.items():
            old = baseline.get(prof, {}).get(key)
            if old is not None and value > old * (1 + margin):
                out.append(f"{prof} {key}: {value:.2f} M > {old:.2f} M x {1 + margin:.2f} ({value / old - 1:+.0%})")
    return out


def _debian_suite() -> str:
    """This host's Debian codename (bookworm), from /etc/os-release."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        text = ""
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    if m is None:
        raise EmulationUnavailable("no VERSION_CODENAME in /etc/os-release: the counting plugin's header comes from "
                                   "Debian's qemu source package, so it needs a Debian host")
    return m.group(1)


def _step(name: str, cmd: Sequence[str], fix: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, errors="replace", timeout=STEP_TIMEOUT,
                              cwd=cwd)
    except FileNotFoundError:
        raise EmulationUnavailable(f"{name}: {cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise EmulationUnavailable(f"{name} took over {STEP_TIMEOUT:.0f} s: {fix}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise EmulationUnavailable(f"{name} failed (exit {proc.returncode}: {lines[-1] if lines else ''}): {fix}")
    return proc


# -- ncnn's own benchmark models (benchncnn), for the device-time model's fit (bottlefit.emulation.devicetime)

# The guest side of one benchncnn model: its .param alone with every weight zero (what benchncnn's
# DataReaderFromEmpty loads), benchncnn's options (fp16 storage and arithmetic, int8, winograd, sgemm, packing, light
# mode), its input filled with 0.01, one warm-up, then RUNS extractions between two marks.
NCNN_BENCH_GUEST = '''\
import os
import sys

import ncnn

param, w, h, c, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
    int(sys.argv[5]), int(sys.argv[6])
net = ncnn.Net()
o = net.opt
o.lightmode = True
o.num_threads = threads
o.use_winograd_convolution = o.use_sgemm_convolution = o.use_int8_inference = True
o.use_fp16_packed = o.use_fp16_storage = o.use_fp16_arithmetic = True
o.use_int8_storage = o.use_int8_arithmetic = o.use_packing_layout = True
o.use_vulkan_compute = False
if net.load_param(param) != 0:
    sys.exit("load_param failed: " + param)
net.load_model(ncnn.DataReaderFromEmpty())
x = ncnn.Mat(w, h, c)
x.fill(0.01)
ins, outs = net.input_names(), net.output_names()


def step():
    ex = net.create_extractor()
    for name in ins:
        ex.input(name, x)
    for name in outs:
        ex.extract(name)


def mark():
    try:
        os.close(@MARK_FD@)
    except OSError:
        pass


step()
mark()
for _ in range(runs):
    step()
mark()
print("ok", runs)
'''.replace("@MARK_FD@", str(MARK_FD))


def count_guest_script(sysroot: Sysroot, core: Core, script: str, args: Sequence[str], *, threads: int = 1,
                       extra_site: Sequence[Path] = (), timeout: float = 1800, plugin: Plugin | None = None,
                       name: str = "guest") -> Count:
    """Guest instructions of ``script`` (Python source, run by the guest's python3.11 on ``core`` with ``args``):
    all it retired and the running count at each ``close(MARK_FD)`` it made. ``extra_site``: folders put before
    the sysroot's site on the guest's PYTHONPATH (an overlay of wheels the sysroot does not hold)."""
    plugin = plugin or ensure_plugin()
    digest = hashlib.sha256(script.encode()).hexdigest()[:12]
    path = cache_dir() / f"count-guest-{digest}.py"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".count-guest-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(script)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return _run_counted(plugin, sysroot, core, path, [str(a) for a in args], threads=threads, extra_site=extra_site,
                        timeout=timeout, name=name)


def _run_counted(plugin: Plugin, sysroot: Sysroot, core: Core, script: Path, args: Sequence[str], *, threads: int,
                 extra_site: Sequence[Path], timeout: float, name: str) -> Count:
    """One guest python3.11 process running ``script`` with ``args`` on ``core`` under the counting plugin."""
    with tempfile.TemporaryDirectory(prefix="bottlefit-cost-") as tmp_name:
        out = Path(tmp_name) / "count.txt"
        cmd = [plugin.qemu, "-plugin", f"{plugin.so},out={out}", "-L", str(core_root(sysroot, core)),
               str(sysroot.python()), "-X", "utf8", str(script), *args]
        site = os.pathsep.join([*(str(p) for p in extra_site), str(sysroot.site)])
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), "LANG": "C.UTF-8",
               "QEMU_CPU": core.cpu, "PYTHONPATH": site, "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": str(threads)}
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, errors="replace", timeout=timeout)
        except OSError as e:
            raise EmulationUnavailable(f"{plugin.qemu} could not start ({e.strerror or e}): reinstall it with "
                                       f"`apt-get install {QEMU_PACKAGE}`") from None
        if proc.returncode != 0 or not out.is_file():
            last = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            raise EmulationUnavailable(f"counting {name} on {core.cpu} failed (exit {proc.returncode}): "
                                       f"{last[-1] if last else 'no output'}")
        text = out.read_text()
        m = re.match(r"insns (\d+)", text)
        if m is None:
            raise EmulationUnavailable(f"the counting plugin wrote no count ({text[:80]!r})")
        return Count(int(m.group(1)), tuple(int(v) for v in re.findall(r"^mark (\d+)$", text, re.M)))


def span_per_run(count: Count, runs: int, name: str) -> float:
    """Instructions of one run: the span between a count's two marks divided by ``runs``."""
    if len(count.marks) != 2:
        raise EmulationUnavailable(f"the counting plugin recorded {len(count.marks)} marks, not 2, for {name}")
    return (count.marks[1] - count.marks[0]) / runs


def ncnn_bench_instructions(sysroot: Sysroot, core: Core, param: Path, shape: tuple[int, int, int], *,
                            threads: int = 1, runs: int = 1, timeout: float = 3600) -> float:
    """Guest instructions of one inference of a benchncnn model (``param`` alone, zero weights, input ``shape`` =
    (w, h, c) as benchncnn gives it) on ``core`` with the sysroot's ncnn and benchncnn's options."""
    w, h, c = shape
    count = count_guest_script(sysroot, core, NCNN_BENCH_GUEST, [str(Path(param).resolve()), w, h, c, threads, runs],
                               threads=threads, timeout=timeout, name=Path(param).name)
    return span_per_run(count, runs, Path(param).name)


# -- wheels beside the sysroot (an overlay keyed on its own pins: adding them to arm64.WHEELS would change the
# sysroot's key and rebuild it for everyone)

OVERLAY_WHEELS: tuple[str, ...] = ("pillow==12.0.0",)  # what a board's `pip install pillow` gets (libjpeg-turbo inside)


def ensure_overlay(pins: Sequence[str] = OVERLAY_WHEELS) -> Path:
    """A folder of aarch64 cp311 wheels (``pins``) unzipped for the guest's PYTHONPATH, built once into the cache
    (``overlay-<key>/site``) and never modified."""
    from bottlefit.emulation.arm64 import _unzip_wheels

    key = hashlib.sha256("\n".join(sorted(pins)).encode()).hexdigest()[:16]
    final = cache_dir() / f"overlay-{key}"
    if (final / "site").is_dir():
        return final / "site"
    cache_dir().mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=".overlay.building-", dir=cache_dir()))
    try:
        _unzip_wheels(list(pins), building / "wheels", building / "site")
        os.chmod(building, 0o755)
        try:
            os.rename(building, final)
        except OSError:
            if not (final / "site").is_dir():
                raise
            shutil.rmtree(building)  # another process made the same overlay first
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return final / "site"


# JPEG encoding on the board: Pillow (its bundled libjpeg-turbo) encodes the model-sized RGB crop at QUALITY, as the
# bench's offload mode does; one warm-up, then RUNS encodings of the same image between two marks.
JPEG_GUEST = '''\
import io
import os
import sys

import numpy as np
from PIL import Image

raw, h, w, quality, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
img = Image.fromarray(np.fromfile(raw, dtype=np.uint8).reshape(h, w, 3))


def step():
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def mark():
    try:
        os.close(@MARK_FD@)
    except OSError:
        pass


step()
mark()
for _ in range(runs):
    out = step()
mark()
print("ok", len(out))
'''.replace("@MARK_FD@", str(MARK_FD))


def jpeg_instructions(sysroot: Sysroot, core: Core, rgb: object, quality: int, *, runs: int = 3) -> float:
    """Guest instructions of one JPEG encoding of ``rgb`` ((H, W, 3) uint8) at ``quality`` with Pillow on ``core``."""
    import numpy as np

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb of shape {rgb.shape}: (H, W, 3) uint8 expected")
    site = ensure_overlay()
    with tempfile.TemporaryDirectory(prefix="bottlefit-jpeg-") as tmp:
        raw = Path(tmp) / "rgb.u8"
        rgb.tofile(raw)
        count = count_guest_script(sysroot, core, JPEG_GUEST, [str(raw), rgb.shape[0], rgb.shape[1], quality, runs],
                                   extra_site=[site], name=f"JPEG q{quality} {rgb.shape[1]}x{rgb.shape[0]}")
    return span_per_run(count, runs, "JPEG encoding")


# -- spans of a guest that marks several (the board's wire encoders: bottlefit.serve.wirecost)


def spans(count: Count) -> list[int]:
    """Instructions between consecutive marks of ``count``."""
    return [b - a for a, b in zip(count.marks[:-1], count.marks[1:], strict=True)]
