from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def export_root(mini_export: Path) -> Path:
    """The session's mini_resnet onnx export (tests/conftest.py): what ``bench split --export`` takes."""
    return mini_export
