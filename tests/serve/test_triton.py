from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from bottlefit.runtimes.head import run_tail
from bottlefit.serve.contract import find_targets
from bottlefit.serve.triton import write_triton_repository


def test_repository_matches_triton_schema_and_runs(mini_export: Path, tmp_path: Path) -> None:
    model_dir = write_triton_repository(mini_export / "onnx" / "manifest.json", tmp_path / "repo", max_batch_size=8)
    assert model_dir == tmp_path / "repo" / "mini_resnet_tail"
    _check_repository(mini_export, model_dir, 8)


def test_export_writes_the_repository(mini_export: Path) -> None:
    """`bottlefit export --target onnx` writes triton/<model>/ itself, hashed in the manifest like any artifact."""
    target = find_targets(mini_export)[0]
    files = {a.file: a for a in target.artifacts}
    for f in ("triton/mini_resnet_tail/config.pbtxt", "triton/mini_resnet_tail/1/model.onnx"):
        assert f in files and files[f].role == "aux" and len(files[f].sha256) == 64
    _check_repository(mini_export, mini_export / "onnx" / "triton" / "mini_resnet_tail", 16)


def _check_repository(mini_export: Path, model_dir: Path, max_batch: int) -> None:
    # Triton's own ModelConfig message (model_config.proto, as tritonclient ships it): unknown fields, wrong types
    # or enum names fail to parse
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "mini_resnet_tail" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == max_batch
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == \
        [("bottleneck", "TYPE_FP32", [4, 5, 5])]  # dims without the batch dimension
    assert [(o.name, model_config_pb2.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output] == \
        [("logits", "TYPE_FP32", [10])]
    assert cfg.HasField("dynamic_batching") and cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert max(cfg.dynamic_batching.preferred_batch_size) <= cfg.max_batch_size

    sess = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "bottleneck" and not isinstance(sess.get_inputs()[0].shape[0], int)
    x = np.random.default_rng(0).standard_normal((3, 4, 5, 5)).astype(np.float32)
    t = find_targets(mini_export)[0]
    np.testing.assert_allclose(sess.run(None, {"bottleneck": x})[0], run_tail(t.tail(), t.path, x), rtol=0, atol=1e-5)


def test_triton_command_writes_the_repository(mini_export: Path, tmp_path: Path, capsys) -> None:
    from bottlefit.cli import main

    assert main(["triton", str(mini_export / "onnx"), "--repo", str(tmp_path / "repo"), "--max-batch-size", "4"]) == 0
    model_dir = tmp_path / "repo" / "mini_resnet_tail"
    assert f"wrote {model_dir}/config.pbtxt" in capsys.readouterr().out
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.max_batch_size == 4 and (model_dir / "1" / "model.onnx").is_file()
    assert main(["triton", str(tmp_path), "--repo", str(tmp_path / "r2")]) == 2  # no export there: one line
