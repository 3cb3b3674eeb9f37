"""``bottlefit inspect``: what a checkpoint holds, and what its split costs on the device and the wire."""

from __future__ import annotations

from typing import Any

from bottlefit.exporter.split import split
from bottlefit.models.checkpoint import LoadedModel


def _size(module: Any) -> tuple[int, int]:
    params = sum(p.numel() for p in module.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    return params, nbytes


def describe(lm: LoadedModel) -> dict[str, Any]:
    sm = split(lm.model, lm.card)
    hp, hb = _size(sm.head)
    tp, tb = _size(sm.tail)
    b = lm.card.bottleneck
    c, h, w = lm.card.input_shape
    wire = {"float32": 4 * b.elements, "float16": 2 * b.elements, "int8": b.elements}
    if b.quantizer == "bq8":
        wire["bq8"] = b.elements + 4 + 1  # uint8 payload + float32 scale + uint8 zero point
    return {
        "checkpoint": {"path": str(lm.path) if lm.path else None, "format": lm.source, "sha256": lm.sha256, **lm.meta},
        "card": lm.card.to_dict(),
        "bottleneck": {"module": b.module, "shape": list(b.shape), "elements": b.elements,
                       "wire_bytes": wire, "vs_raw_rgb_uint8": b.elements / (c * h * w)},
        "head": {"params": hp, "bytes_fp32": hb},
        "tail": {"params": tp, "bytes_fp32": tb},
    }


def render(d: dict[str, Any]) -> str:
    ck, card, b = d["checkpoint"], d["card"], d["bottleneck"]
    lines = [
        f"checkpoint   {ck['path'] or '(untrained)'}  [{ck['format']}]",
        f"architecture {card['arch']}  {card['params']}",
        f"weights      {card['weights']}" + (f"  (best top-1 {ck['best_value']:.2f}%)" if "best_value" in ck else ""),
        f"input        {'x'.join(map(str, card['input_shape']))}  resize {card['resize']}",
        f"bottleneck   {b['module']} -> {'x'.join(map(str, b['shape']))} = {b['elements']:,} values "
        f"({100 * b['vs_raw_rgb_uint8']:.2f}% of the raw uint8 RGB input)",
        "wire bytes   " + ", ".join(f"{k} {v:,}" for k, v in b["wire_bytes"].items()),
        f"head         {d['head']['params']:,} params, {d['head']['bytes_fp32'] / 1024:.1f} KiB fp32",
        f"tail         {d['tail']['params']:,} params, {d['tail']['bytes_fp32'] / 2**20:.1f} MiB fp32",
    ]
    return "\n".join(lines)
