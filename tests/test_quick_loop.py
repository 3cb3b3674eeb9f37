"""The quick loop (``./run test -m "not slow"``) keeps every test module in it: marking a module's last cheap test
slow would silently drop that area from the loop a developer runs between changes.

Read from the files' syntax (a test is slow by a ``@pytest.mark.slow`` decorator, a module by ``pytestmark``), so
this costs no collection of the suite."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# Modules whose every test needs what the quick loop leaves out, each with what the loop runs instead.
ALL_SLOW = {
    "serve/test_triton_server.py": "a real tritonserver; the repository it loads: serve/test_triton.py",
    "targets/rpi/test_diagnose_tflite.py": "a DenseNet-169 rpi export; the diagnosis itself: parity/test_diagnose.py",
    "targets/rpi/test_emulated.py": "the R152 rpi bundle on emulated Pis; emulation: emulation/test_arm64.py",
    "targets/rpi/test_litert_runner.py": "the R152 head's .tflite; the LiteRT runner: runtimes/test_runners.py",
    "targets/rpi/test_onnx_int8.py": "the R152 head's asymmetric int8 ONNX; the asymmetric Q/DQ writer: "
                                     "calibration/test_recipe.py",
    "training/test_ddp.py": "two torchrun processes training; the loop's steps: training/test_loop_steps.py",
}


def _is_slow_mark(node: ast.expr) -> bool:
    """``pytest.mark.slow`` (also called, or inside a list of marks)."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.List | ast.Tuple):
        return any(_is_slow_mark(e) for e in node.elts)
    return isinstance(node, ast.Attribute) and node.attr == "slow" and ast.unparse(node.value) == "pytest.mark"


def quick_tests(path: Path) -> tuple[list[str], list[str]]:
    """(names of the tests the quick loop runs, names it leaves to the full suite) of one test module."""
    tree = ast.parse(path.read_text(), str(path))
    module_slow = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                      and _is_slow_mark(n.value) for n in tree.body)
    quick, slow = [], []

    def visit(body: list[ast.stmt], class_slow: bool) -> None:
        for n in body:
            if isinstance(n, ast.ClassDef) and n.name.startswith("Test"):
                visit(n.body, class_slow or any(_is_slow_mark(d) for d in n.decorator_list))
            elif isinstance(n, ast.FunctionDef) and n.name.startswith("test_"):
                is_slow = module_slow or class_slow or any(_is_slow_mark(d) for d in n.decorator_list)
                (slow if is_slow else quick).append(n.name)

    visit(tree.body, False)
    return quick, slow


def test_mark_reader_sees_decorators_and_module_marks(tmp_path: Path) -> None:
    f = tmp_path / "test_x.py"
    f.write_text("import pytest\n\n@pytest.mark.slow\ndef test_a(): pass\n\n"
                 "@pytest.mark.parametrize('x', [1])\ndef test_b(x): pass\n\n"
                 "class TestC:\n    @pytest.mark.slow()\n    def test_d(self): pass\n")
    assert quick_tests(f) == (["test_b"], ["test_a", "test_d"])
    f.write_text("import pytest\npytestmark = [pytest.mark.slow]\n\ndef test_a(): pass\n")
    assert quick_tests(f) == ([], ["test_a"])


def test_every_test_module_keeps_a_quick_test() -> None:
    modules = sorted(TESTS.rglob("test_*.py"))
    assert len(modules) > 40  # the suite's modules were found
    dropped = [str(m.relative_to(TESTS)) for m in modules if not quick_tests(m)[0]]
    assert dropped == sorted(ALL_SLOW), "modules the quick loop (-m 'not slow') runs no test of: keep one cheap " \
                                        "test, or name the module in ALL_SLOW with what covers its area instead"
