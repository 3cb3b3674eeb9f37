"""``bottlefit jetson build DIR``: build the head's TensorRT engine from an exported Jetson bundle through
the TensorRT Python API, then check it against the bundle's golden outputs (the board-side equivalent of
build_engine.sh, for boards and NVIDIA containers with the ``tensorrt`` module).

Exit codes as everywhere: 0 PASS, 1 the engine's outputs broke a tolerance, 2 bad input or no TensorRT here.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.errors import UserError
from bottlefit.exporter.artifact import Artifact

_METRIC_OPS = {"max_abs_error": "<=", "mean_abs_error": "<=", "cosine": ">=", "sqnr_db": ">="}


def register(subparsers: Any, common: Any) -> None:
    from bottlefit.targets.jetson.trtexec import ROUTES

    p = subparsers.add_parser("jetson", parents=[common], help="Jetson bundle tools (TensorRT engine build and check)")
    jsub = p.add_subparsers(dest="jetson_command", required=True)
    b = jsub.add_parser("build", parents=[common],
                        help="build head.engine from an export's jetson/ folder and verify it")
    b.add_argument("dir", help="the OUT/jetson folder written by `bottlefit export --target jetson`")
    b.add_argument("--route", choices=list(ROUTES),
                   help="qdq: Q/DQ ONNX; cache: head.onnx + calibration cache; fp16/fp32 (default: the bundle's first)")
    b.add_argument("--workspace-mib", type=int, default=1024, help="TensorRT builder workspace limit (MiB)")
    b.add_argument("--json", action="store_true",
                   help="print the engine, its route and every golden check as one JSON object (progress to stderr)")
    b.set_defaults(func=run_build)


def bundle_info(manifest: dict[str, Any]) -> dict[str, Any]:
    """The Jetson request recorded at export (profile, JetPack, routes)."""
    if manifest.get("target") != "jetson":
        raise UserError(f"not a Jetson bundle (target {manifest.get('target')!r}); pass OUT/jetson")
    for a in manifest["artifacts"]:
        info = a.get("extra", {}).get("jetson")
        if info:
            return dict(info)
    raise UserError("the manifest does not record the Jetson profile; re-export with --target jetson")


def check_bundle_cache(target_dir: Path, manifest: dict[str, Any], profile: Any) -> dict[str, float]:
    """The bundle's calibration cache, refused when made for another TensorRT or bound to another ONNX."""
    from bottlefit.calibration.trt_cache import check_cache
    from bottlefit.exporter.manifest import sha256_file

    art = next((Artifact.from_dict(a) for a in manifest["artifacts"] if a.get("extra", {}).get("binds")), None)
    if art is None:
        raise UserError(f"{target_dir}: the manifest lists no calibration cache; use --route qdq")
    binds = art.extra["binds"]
    onnx_path = target_dir / binds["onnx"]
    if not onnx_path.is_file():
        raise UserError(f"{onnx_path}: the ONNX the cache is bound to is missing; re-export")
    return check_cache(target_dir / art.file, profile.trt_code, sha256_file(onnx_path),
                       {**binds, "sha256": art.sha256})


def _read_golden(golden_dir: Path) -> dict[str, Any]:
    from bottlefit.targets.jetson.trtexec import GOLDEN_FORMAT

    path = golden_dir / "golden.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: golden data missing; re-export") from None
    if doc.get("format") != GOLDEN_FORMAT:
        raise UserError(f"{path}: format {doc.get('format')!r}, expected {GOLDEN_FORMAT!r}")
    return doc


def _load_f32(path: Path, shape: list[int]) -> np.ndarray:
    return np.fromfile(path, dtype="<f4").reshape(shape)


@dataclass(frozen=True)
class GoldenCheck:
    """One metric of one engine output against golden.json's tolerance."""

    output: str
    metric: str
    value: float
    op: str  # "<=" or ">="
    limit: float
    ok: bool

    def line(self) -> str:
        mark = "ok " if self.ok else "FAIL"
        return f"  {mark} {self.output} {self.metric} {self.value:.6g} ({self.op} {self.limit:g})"


def compare_golden(golden_dir: Path, produced: dict[str, np.ndarray], precision: str) -> list[GoldenCheck]:
    """The engine's outputs against golden.json with its tolerances for ``precision`` (parity's metrics)."""
    from bottlefit.parity import metrics

    doc = _read_golden(golden_dir)
    tol = doc["tolerances"].get(precision)
    if tol is None:
        raise UserError(f"{golden_dir}/golden.json has no tolerances for {precision}")
    checks = []
    for spec in doc["outputs"]:
        name = spec["name"]
        ref = _load_f32(golden_dir / spec["file"], spec["shape"])
        if name not in produced:
            raise UserError(f"the engine has no output {name!r} (it has {sorted(produced)}); rebuild it")
        got = np.asarray(produced[name])
        if got.dtype == np.int8:  # the engine emits int8 codes: float = scale * q (zero point 0)
            got = got.astype(np.float32) * np.float32(spec["scale"])
        got = got.astype(np.float32).reshape(ref.shape)
        for key, value in tol.items():
            v = float(metrics.BOTTLENECK_METRICS[key](ref, got))
            good = v <= value if _METRIC_OPS[key] == "<=" else v >= value
            checks.append(GoldenCheck(name, key, v, _METRIC_OPS[key], float(value), bool(good)))
    return checks


def build_report(checks: list[GoldenCheck], engine: Path, route: str, precision: str, profile: str,
                 tensorrt: str) -> dict[str, Any]:
    """What ``jetson build --json`` prints: the verdict, the engine and how it was built, every golden check."""
    return {"verdict": "PASS" if all(c.ok for c in checks) else "FAIL", "engine": str(engine), "route": route,
            "precision": precision, "profile": profile, "tensorrt": tensorrt, "checks": [asdict(c) for c in checks]}


def run_build(args: argparse.Namespace) -> int:
    from bottlefit.exporter.manifest import check_hashes, read_manifest
    from bottlefit.runtimes.tensorrt import TensorRTRunner, import_tensorrt
    from bottlefit.targets.jetson import CACHE, GOLDEN_DIR, HEAD_ONNX, QDQ_ONNX
    from bottlefit.targets.jetson.engine import build_engine
    from bottlefit.targets.jetson.profiles import get_profile
    from bottlefit.targets.jetson.trtexec import ROUTES, engine_path

    target_dir = Path(args.dir)
    manifest = read_manifest(target_dir)
    info = bundle_info(manifest)
    profile = get_profile(info["profile"], info.get("jetpack"))
    route = args.route or info["routes"][0]
    r = ROUTES[route]
    # The cache first: its own message (wrong TensorRT, stale ONNX) says more than a hash mismatch would.
    if r.calib:
        check_bundle_cache(target_dir, manifest, profile)
    check_hashes(target_dir, manifest)
    trt = import_tensorrt()  # exit 3 with the reason where TensorRT is missing

    onnx_file = QDQ_ONNX if r.onnx_key == "qdq_onnx" else HEAD_ONNX
    engine = target_dir / engine_path(route)
    say = (lambda m: print(m, file=sys.stderr)) if args.json else print
    say(f"building {engine} with TensorRT {trt.__version__} for {profile.describe()} ({route}, {r.precision})")
    build_engine(target_dir / onnx_file, engine, profile, r.precision,
                 calib_cache=target_dir / CACHE if r.calib else None, workspace_mib=args.workspace_mib,
                 force=bool(info.get("force")))
    golden_dir = target_dir / GOLDEN_DIR
    doc = _read_golden(golden_dir)
    inputs = {i["name"]: _load_f32(golden_dir / i["file"], i["shape"]) for i in doc["inputs"]}
    produced = TensorRTRunner(engine).infer(inputs)
    checks = compare_golden(golden_dir, produced, r.precision)
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps(build_report(checks, engine, route, r.precision, profile.name, str(trt.__version__))))
    else:
        print("\n".join(c.line() for c in checks))
        print(f"{'PASS' if ok else 'FAIL'}: {engine}")
    return 0 if ok else 1
