from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def export_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained mini_resnet exported for onnx (int8 Q/DQ head, fp32 head and tail): seconds to build."""
    from bottlefit.pipeline.export import export
    from bottlefit.pipeline.options import ExportRequest, ModelSource, ParityOptions
    from bottlefit.targets import Emulate
    from bottlefit.targets.onnx import OnnxOptions

    out = tmp_path_factory.mktemp("bench") / "export"
    export(ExportRequest(ModelSource(untrained=True, arch="mini_resnet", bottleneck_channel=4), "onnx", out,
                         OnnxOptions(int8=True), parity=ParityOptions(emulate=Emulate.parse("none"))))
    return out
