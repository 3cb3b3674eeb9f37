"""``verify(staged=True)``: what can stop a recipe ladder first (fp32 artifacts whole, int8 heads' bottleneck gates),
the int8 heads' logits checks, host executions, diagnoses and budgets pending, and ``complete()`` giving exactly
the verdict of an unstaged call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bottlefit.exporter.manifest import check_hashes, read_manifest
from bottlefit.exporter.split import fold_head, split
from bottlefit.models.card import ModelCard
from bottlefit.parity.tolerances import parse_overrides
from bottlefit.parity.verify import verify
from bottlefit.pipeline import source
from bottlefit.pipeline.verify import heldout_for

# the int8 Q/DQ head fails this (mini_resnet's measures ~34 dB), so its budget and diagnosis are made too
FAIL_INT8 = parse_overrides(["head.int8.onnx:bottleneck.sqnr_db=60"])


def _judge(mini_export: Path, staged: bool, overrides: dict) -> Any:
    d = mini_export / "onnx"
    m = read_manifest(d)
    arts = check_hashes(d, m)
    card = ModelCard.from_dict(m["model_card"])
    held = heldout_for(m, card, None)
    lm = source.reload(m["source"])
    sm = split(lm.model, lm.card)
    if m.get("equalization"):
        from bottlefit.exporter.equalize import apply_equalization

        sm = apply_equalization(sm, m["equalization"])
    if m.get("head_folds"):
        sm, _ = fold_head(sm)
    return verify(sm, arts, d, "onnx", np.asarray(held.images, np.float32), held.describe(), overrides,
                  staged=staged)


def test_staged_verdict_holds_what_decides_a_ladder_and_completes_to_the_unstaged_one(mini_export: Path) -> None:
    whole = _judge(mini_export, False, FAIL_INT8)
    staged = _judge(mini_export, True, FAIL_INT8)
    assert whole.pending is None and not whole.passed
    assert staged.pending is not None and "head.int8.onnx" in staged.pending
    by = {(c.artifact, c.metric) for c in staged.checks}
    # fp32 artifacts whole; the int8 head's bottleneck figures only, and no host execution yet
    assert {("head.onnx", "logits.max_abs_error"), ("tail.onnx", "logits.top1_agreement")} <= by
    assert {m for a, m in by if a == "head.int8.onnx"} == {"bottleneck.max_abs_error", "bottleneck.mean_abs_error",
                                                          "bottleneck.cosine", "bottleneck.sqnr_db"}
    assert staged.execution == [] and staged.diagnosis == {} and staged.budget == {}
    [failed] = staged.failures()
    assert (failed.artifact, failed.metric) == ("head.int8.onnx", "bottleneck.sqnr_db") and failed.value < 60
    done = staged.complete()
    assert done is staged and staged.pending is None
    assert json.dumps(staged.to_dict()) == json.dumps(whole.to_dict())  # the same checks, in the same order
    assert staged.markdown() == whole.markdown()
    assert "head.int8.onnx" in staged.diagnosis and "head.int8.onnx" in staged.budget
    assert [e.artifact for e in staged.execution] == ["head.int8.onnx"]
    assert staged.complete() is staged and json.dumps(staged.to_dict()) == json.dumps(whole.to_dict())


def test_a_passing_staged_verdict_completes_to_the_unstaged_one(mini_export: Path) -> None:
    whole = _judge(mini_export, False, {})
    staged = _judge(mini_export, True, {})
    assert whole.passed and staged.failures() == []
    assert json.dumps(staged.complete().to_dict()) == json.dumps(whole.to_dict())
