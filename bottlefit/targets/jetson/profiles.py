"""Jetson boards as data: one table row per (board, JetPack) pair, no per-board branches elsewhere.

Facts from docs/tensorrt.md (read from TensorRT's own sources at the versions JetPack ships).
"""

from __future__ import annotations

from dataclasses import dataclass

from bottlefit.errors import UserError

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Profile:
    name: str  # the user-facing profile name (nano | xavier-nx | orin)
    gpu: str  # architecture, for messages
    sm: str  # compute capability, "major.minor"
    jetpack: tuple[str, ...]  # JetPack releases this row covers ("5.1" also covers 5.1.x); first = shown
    trt_version: str  # "major.minor.patch" of the TensorRT JetPack ships
    max_opset: int  # highest ONNX opset the parser documents (and this toolchain exports) for the board
    fast_int8: bool  # the GPU has int8 kernels (SM >= 6.1)
    dla_cores: int
    tf32: bool  # Ampere+: fp32 layers run as TF32 unless --noTF32, which skews fp32 comparisons
    default_precision: str
    workspace_flag: str  # trtexec's spelling of the workspace limit; {mib} is replaced
    build_only_flag: str  # build the engine without the inference pass (renamed in 8.6)
    int8_export_numeric: bool  # --exportOutput prints int8 outputs as numbers (8.2 streams raw chars)
    board_python: str  # the board's default python3, for the stdlib-only verifier

    @property
    def trt_code(self) -> int:
        """The NV_TENSORRT_VERSION number the calibration-cache header must carry."""
        return trt_version_code(self.trt_version)

    @property
    def ops_key(self) -> str:
        """Key of this TensorRT version in trt_ops.json ("8.2", "8.5", "10.3")."""
        major, minor = self.trt_version.split(".")[:2]
        return f"{major}.{minor}"

    def workspace(self, mib: int) -> str:
        return self.workspace_flag.format(mib=int(mib))

    def describe(self) -> str:
        return f"{self.name} (JetPack {self.jetpack[0]}, TensorRT {self.trt_version}, SM {self.sm})"


_NANO = Profile(
    name="nano",
    gpu="Maxwell",
    sm="5.3",
    # 4.6.0 ships TensorRT 8.0.1 (another cache header): refused, see _REFUSED_JETPACK.
    jetpack=("4.6",),
    trt_version="8.2.1",
    max_opset=13,
    fast_int8=False,
    dla_cores=0,
    tf32=False,
    default_precision="fp16",
    workspace_flag="--workspace={mib}",
    build_only_flag="--buildOnly",
    int8_export_numeric=False,
    board_python="3.6",
)
_XAVIER_NX = Profile(
    name="xavier-nx",
    gpu="Volta",
    sm="7.2",
    jetpack=("5.1",),
    trt_version="8.5.2",
    max_opset=17,
    fast_int8=True,
    dla_cores=2,
    tf32=False,
    default_precision="int8",
    # --workspace still works on 8.5 but warns; memPoolSize takes MiB without a suffix there.
    workspace_flag="--memPoolSize=workspace:{mib}",
    build_only_flag="--buildOnly",
    int8_export_numeric=True,
    board_python="3.8",
)
_ORIN_JP5 = Profile(
    name="orin",
    gpu="Ampere",
    sm="8.7",
    jetpack=_XAVIER_NX.jetpack,
    trt_version="8.5.2",
    max_opset=17,
    fast_int8=True,
    dla_cores=2,
    tf32=True,
    default_precision="int8",
    workspace_flag="--memPoolSize=workspace:{mib}",
    build_only_flag="--buildOnly",
    int8_export_numeric=True,
    board_python="3.8",
)
_ORIN_JP6 = Profile(
    name="orin",
    gpu="Ampere",
    sm="8.7",
    jetpack=("6.1", "6.2"),
    # The 10.x parser documents opsets 9-20, but 10.3's own operator list is unverified: stay at 17.
    trt_version="10.3.0",
    max_opset=17,
    fast_int8=True,
    dla_cores=2,
    tf32=True,
    default_precision="int8",
    # 10.x removed --workspace and --buildOnly (both are "Unknown option", exit 1).
    workspace_flag="--memPoolSize=workspace:{mib}M",
    build_only_flag="--skipInference",
    int8_export_numeric=True,
    board_python="3.10",
)

# The table: the first row of a name is its default (Orin defaults to JetPack 6 / TensorRT 10.3).
PROFILES: tuple[Profile, ...] = (_NANO, _XAVIER_NX, _ORIN_JP6, _ORIN_JP5)

# JetPack releases that exist for a board but ship a TensorRT this table does not describe.
_REFUSED_JETPACK = {"4.6.0": "TensorRT 8.0.1", "6.0": "TensorRT 8.6.2"}


def names() -> list[str]:
    return list(dict.fromkeys(p.name for p in PROFILES))


def _covers(row: Profile, jetpack: str) -> bool:
    # "6" picks the JetPack 6 row; "4.6.4" is covered by "4.6".
    return any(jetpack in (jp, jp.split(".")[0]) or jetpack.startswith(jp + ".") for jp in row.jetpack)


def get_profile(name: str, jetpack: str | None = None) -> Profile:
    rows = [p for p in PROFILES if p.name == name]
    if not rows:
        raise UserError(f"unknown Jetson profile {name!r}; choose one of: {', '.join(names())}")
    if jetpack is None:
        return rows[0]
    jetpack = jetpack.strip()
    if jetpack in _REFUSED_JETPACK:
        raise UserError(
            f"profile {name!r}: JetPack {jetpack} ships {_REFUSED_JETPACK[jetpack]}, which this toolchain "
            f"does not target; supported: {', '.join(jp for row in rows for jp in row.jetpack)}"
        )
    for row in rows:
        if _covers(row, jetpack):
            return row
    known = ", ".join(jp for row in rows for jp in row.jetpack)
    raise UserError(f"profile {name!r} does not cover JetPack {jetpack}; supported: {known}")


def trt_version_code(version: str) -> int:
    """NV_TENSORRT_VERSION: major*1000+minor*100+patch before 10, major*10000+minor*100+patch from 10.

    Accepts "8.2.1", "8.2.1.8" (build number ignored) or "10.3.0.30".
    """
    parts = version.strip().split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
        patch = int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        raise UserError(f"not a TensorRT version: {version!r} (expected e.g. 8.5.2)") from None
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def check_request(profile: Profile, precision: str, opset: int, force: bool = False) -> list[str]:
    """Reasons the board cannot honour (precision, opset). Empty means fine.

    The caller raises UserError with these unless forced; ``force`` only drops the hint on how to override.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    hint = "" if force else " (pass --force to build it anyway)"
    reasons = []
    if precision == "int8" and not profile.fast_int8:
        reasons.append(
            f"{profile.describe()}: the {profile.gpu} GPU has no int8 kernels, so an int8 engine would run "
            f"slower than fp16 or fail to build with Q/DQ; use --precision fp16{hint}"
        )
    if opset > profile.max_opset:
        reasons.append(
            f"{profile.describe()}: ONNX opset {opset} is above the parser's documented maximum "
            f"{profile.max_opset}; export with --opset {profile.max_opset} or lower{hint}"
        )
    return reasons
