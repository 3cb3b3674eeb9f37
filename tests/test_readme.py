"""The README's promises that code can check: its Python example runs as written (in a scratch folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands() -> None:
    block = README.read_text().split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["./run", "./run test"]


def test_library_example_runs_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code = re.search(r"## From Python.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})  # noqa: S102 - our own README's example
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "out/rpi PASS"
    assert any("head.int8.onnx on emulated" in line for line in out)
    assert (tmp_path / "out" / "rpi" / "manifest.json").is_file()
