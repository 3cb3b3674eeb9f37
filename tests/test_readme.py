"""The README's promises that code can check: its Python example runs as written (in a scratch folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands() -> None:
    block = README.read_text().split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["./run", "./run test"]


@pytest.mark.slow
def test_library_example_runs_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code = re.search(r"## From Python.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})  # noqa: S102 - our own README's example
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "out/rpi PASS"
    assert any("head.int8.onnx on emulated" in line for line in out)
    assert (tmp_path / "out" / "rpi" / "manifest.json").is_file()


def test_readme_says_what_the_first_run_does_and_costs() -> None:
    """What `./run` does on a fresh clone, with its measured costs: the install, the training, the sysroot."""
    paragraph = README.read_text().split("**The first run**", 1)[1].split("\n\n", 1)[0]
    first = " ".join(paragraph.split())
    for fact in ("7.6 GB", "2 min", "3 + 4 + 4 epochs", "arm64 sysroot", "110 MB downloaded", "447 MB on disk",
                 "55 s wall", "1.76 GB peak memory", "Later runs reuse"):
        assert fact in first, fact
    run = (README.parent / "run").read_text()
    assert "a few minutes" not in run and "about 7.6 GB" in run
