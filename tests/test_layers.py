"""The house reads top-down: the layer contract in pyproject.toml holds, and no module imports itself in a circle.

Both run on grimp's import graph of the installed package (what import-linter builds), function-level imports
included: a lazy import is still a dependency.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_layer_contract_is_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    cp = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
    assert cp.returncode == 0, cp.stdout[-4000:] + cp.stderr[-2000:]
    assert "1 kept, 0 broken" in cp.stdout


def test_no_import_circles() -> None:
    graph = grimp.build_graph("bottlefit")
    circles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if imported == importer or imported.startswith(importer + ".") or importer.startswith(imported + "."):
                continue  # a package importing its own submodules (or the reverse) is its own business
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                circles.append(" -> ".join((importer, *back)))
    assert not circles, "\n".join(circles)


def test_the_contract_would_catch_an_upward_import(tmp_path: Path) -> None:
    """The check is live: an import from a lower layer up to a higher one breaks it."""
    pkg = tmp_path / "bottlefit"
    subprocess.run(["cp", "-r", str(ROOT / "bottlefit"), str(pkg)], check=True)
    (pkg / "models" / "upward.py").write_text("from bottlefit.parity import verify  # noqa: F401\n")
    lint = Path(sys.executable).with_name("lint-imports")
    cp = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True,
                        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert cp.returncode == 1 and "bottlefit.models.upward -> bottlefit.parity.verify" in cp.stdout
