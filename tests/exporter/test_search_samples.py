"""The range search's samples and scores, held with less memory, are the numbers the stacked samples gave."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from bottlefit.calibration.search import _sqnr, search
from bottlefit.exporter.onnx import export_onnx
from bottlefit.exporter.qdq import (
    _float_activations,
    _session,
    layer_probes,
    observe_and_sample,
    prepare_fp32,
    sample_indices,
    search_activations,
    search_table,
)


def tiny_model(tmp_path) -> onnx.ModelProto:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU(),
                         nn.Conv2d(8, 4, 2, 2, 0)).eval()
    x = torch.from_numpy(calib(1))
    return prepare_fp32(export_onnx(head, x, tmp_path / "h.onnx", 13, "input", "out").path)[0]


def calib(n: int = 7) -> np.ndarray:
    return np.random.default_rng(0).standard_t(4, size=(n, 3, 24, 24)).astype(np.float32)


def stacked_samples(model: onnx.ModelProto, images: np.ndarray, keep: int) -> dict[str, np.ndarray]:
    """The samples as the search stacked them before: a list per tensor, concatenated at the end."""
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    names = _float_activations(probe)
    input_name = probe.graph.input[0].name
    existing = {o.name for o in probe.graph.output}
    for n in names:
        if n not in existing and n != input_name:
            probe.graph.output.append(helper.make_empty_tensor_value_info(n))
    sess = _session(probe)
    run_names = [o.name for o in sess.get_outputs()]
    kept: dict[str, list[np.ndarray]] = {}
    for i in sample_indices(len(images), keep):
        x = np.ascontiguousarray(images[i : i + 1])
        for n, a in zip([input_name, *run_names], [x, *sess.run(run_names, {input_name: x})], strict=True):
            kept.setdefault(n, []).append(a)
    return {n: np.concatenate(v) for n, v in kept.items()}


def test_preallocated_samples_equal_the_stacked_ones_exactly(tmp_path) -> None:
    model, images = tiny_model(tmp_path), calib()
    for keep in (3, 7):  # some images spread over the 7, and all of them
        _, got = observe_and_sample(model, images, "search", keep=keep)
        want = stacked_samples(model, images, keep)
        assert list(got) == list(dict.fromkeys([model.graph.input[0].name, *_float_activations(model)]))
        assert len(got) == 6  # input, 2 convs, 2 relus, output
        for n, a in want.items():
            assert got[n].shape == a.shape and got[n].shape[0] == keep and got[n].dtype == np.float32
            assert got[n].tobytes() == a.tobytes()


def test_in_place_sqnr_equals_the_two_temporary_formula_exactly() -> None:
    rng = np.random.default_rng(3)
    ref = torch.from_numpy(rng.standard_normal((5, 8, 13, 13)).astype(np.float32))
    err = torch.from_numpy((rng.standard_normal((5, 8, 13, 13)) * 1e-2).astype(np.float32))
    before = ref.clone(), err.clone()
    s, n = float((ref.double() ** 2).sum()), float((err.double() ** 2).sum())
    assert _sqnr(ref, err) == 10.0 * np.log10(s / n)  # bit for bit, not approximately
    assert torch.equal(ref, before[0]) and torch.equal(err, before[1])  # inputs untouched


def test_consuming_search_chooses_the_same_ranges_and_scores(tmp_path) -> None:
    model, images = tiny_model(tmp_path), calib()
    for symmetric in (True, False):
        observers, kept = observe_and_sample(model, images, "search", keep=7)
        want = search(observers, dict(kept), symmetric, probes=layer_probes(model))
        got = search(observers, kept, symmetric, probes=layer_probes(model), consume=True)
        assert kept == {}  # every searched tensor's samples were released
        assert [(n, o.range()) for n, o in got[0].items()] == [(n, o.range()) for n, o in want[0].items()]
        assert {n: c.to_dict() for n, c in got[1].items()} == {n: c.to_dict() for n, c in want[1].items()}
        assert {n: c.errors_db for n, c in got[1].items()} == {n: c.errors_db for n, c in want[1].items()}
    fixed, choices = search_activations(model, images, symmetric=False)
    assert len(choices) == 6 and all(c.judged_by in ("layer", "tensor") for c in choices.values())
    table = search_table(model, images, symmetric=False)
    first = stacked_samples(model, images, 7)
    assert {e.name: e.sample.tobytes() for e in table} == {e.name: first[e.name][:1].tobytes() for e in table}
