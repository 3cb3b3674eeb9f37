"""``bench split``'s report: the table (mode x link), the plots, the markdown report and the JSON for CI.

Written into OUT: ``split.json`` (schema ``bottlefit.splitbench.split/1``), ``split.md``, ``split_latency.png`` (median
end-to-end latency against link rate per mode, p95 as the bar), ``split_bytes.png`` (payload and bytes on the link
per mode and link). Each file is written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from bottlefit.files import atomic_write_bytes, atomic_write_text

MODE_TEXT = {"local": "local (whole model on the device)", "offload": "offload (JPEG to the server)",
             "split": "split (head on the device, bottleneck to the tail)",
             "split_triton": "split through Triton (the same frames to the ensemble)"}
COLORS = {"local": "#4c72b0", "offload": "#dd8452", "split": "#55a868", "split_triton": "#8172b3"}


def table(result: dict[str, Any]) -> str:
    head = ("| mode | link | median ms | p95 ms | device ms | device basis | network ms | server ms | payload B "
            "| link B | failed |\n|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    lines = [head]
    labels = {p["name"]: p["label"] for p in result["links"]}
    for r in sorted(result["rows"], key=lambda r: (r["mode"], r["rate_mbit"])):
        lines.append(f"| {r['mode']} | {labels[r['link']]} | {r['latency_ms_median']:.1f} | {r['latency_ms_p95']:.1f} "
                     f"| {r['device_ms_median']:.2f} | {r.get('device_basis', '')} | {r['network_ms_median']:.1f} "
                     f"| {r['server_ms_median']:.2f} "
                     f"| {r['payload_bytes_median']:.0f} | {r['link_bytes_median']:.0f} | {r['failed']} |")
    return "\n".join(lines)


def device_lines(dev: dict[str, Any]) -> str:
    """One line per mode: the device's milliseconds and how they were had (measured / predicted / extrapolated /
    assumed)."""
    return "\n".join(f"  - {mode}: **{m['basis']}**: {m['why']}" for mode, m in dev.get("modes", {}).items())


def markdown(result: dict[str, Any]) -> str:
    acc, dev, setup = result["accuracy"], result["device"], result["link_setup"]
    links = "\n".join(f"| {p['label']} | {p['rate_mbit']:g} | {p['rtt_ms']:g} | {p['loss_pct']:g} |"
                      for p in result["links"])
    wires = ", ".join(f"{w} {f['bytes']:.0f} B, {f['encode_ms_device']:.1f} ms + {f['decode_ms_server']:.1f} ms"
                      for w, f in acc["wires"].items())
    labels = {p["name"]: p["label"] for p in result["links"]}
    ratio_rows = "\n".join(f"| {labels[r['link']]} | {r['split_vs_local_pct']:+.1f}% "
                           f"| {r['split_vs_offload_pct']:+.1f}% | {-r['payload_smaller_pct']:+.1f}% |"
                           for r in result["ratios"])
    model_text = ", ".join(f"{r['mode']}/{labels[r['link']]} {r['link_model_ms_median']:.1f} ms"
                           for r in result["rows"] if r["mode"] != "local")
    tradeoff = result.get("tradeoff") or {}
    trade = (f"\nCompression–accuracy trade-off: see tradeoff.md ({len(tradeoff.get('rows', []))} bottleneck "
             "widths).\n" if tradeoff.get("rows") else
             f"\nCompression–accuracy trade-off: not run ({tradeoff.get('skipped', 'not asked for')}).\n")
    return f"""# bottlefit bench split

**{result['headline']}**

Model: {result['model']['source']} ({result['model']['arch']}). {result['images']} images x {result['repeats']}
repeat(s) per link and mode, the three modes interleaved image by image in one run; wall time {result['wall_s']} s.

- Links: {result['link_setup_text']}.
- Device: {dev['name']}, {dev['label']} ({dev['basis']}); {dev['how']}.
{device_lines(dev)}
- Split: head {acc['head']} ({acc['head_runtime']}), wire `{result['wire']}` (per wire on these images: mean
  payload, device-side encoding + server-side decoding: {wires}).
  Offload: JPEG quality {result['jpeg_quality']} of the model's input crop (mean {acc['jpeg_bytes_mean']:.0f} B).
- Server time: measured at the server side's relay, from the request's last byte to the response's first.
  Network ms = the client's round trip; the link profile alone accounts for {model_text} of it (two round trips
  and each direction's frames at the rate), the server for the server ms, the rest is the software stack's own.
- Payload B: the tensor bytes the client sent (coded bottleneck or JPEG); link B: {'bytes through the device-side '
  'veth, both directions, headers and handshakes included' if setup['kind'] == 'netns' else 'TCP payload bytes '
  'counted at the relay, both directions, plus 66 B of headers per 1448-B frame (analytic model)'}.

| link | Mbit/s | RTT ms | loss % |
|---|---:|---:|---:|
{links}

{table(result)}

Split against the other two modes, medians of the same run (negative: split is faster / smaller):

| link | split vs local | split vs offload | payload vs JPEG |
|---|---:|---:|---:|
{ratio_rows}

Top-1 on {acc['images']} images ({acc['against']}): local {acc['local']:.2f}%, offload (JPEG q{acc['jpeg_quality']})
{acc['offload']:.2f}%, split {acc['split']:.2f}% (the headline's Δtop-1: split minus offload, in points).
{trade}
![latency](split_latency.png)
![bytes](split_bytes.png)
"""


def _plots(result: dict[str, Any]) -> tuple[bytes, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = {"Software": None, "Creation Time": None}  # same run, same bytes: no timestamps in the PNGs
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for mode in ("local", "offload", "split", "split_triton"):
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["rate_mbit"])
        if not rs:  # split_triton only with --server triton
            continue
        x = [r["rate_mbit"] for r in rs]
        y = [r["latency_ms_median"] for r in rs]
        err = [[0 for _ in rs], [max(0.0, r["latency_ms_p95"] - r["latency_ms_median"]) for r in rs]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=MODE_TEXT[mode], color=COLORS[mode])
    for r in (r for r in rows if r["mode"] == "offload"):
        label = next(p["label"] for p in result["links"] if p["name"] == r["link"])
        ax.annotate(f"{label}\nRTT {r['rtt_ms']:g} ms", (r["rate_mbit"], r["latency_ms_median"]), fontsize=7,
                    textcoords="offset points", xytext=(0, 8), ha="center")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate (Mbit/s)")
    ax.set_ylabel("end-to-end latency (ms, median; bar to p95)")
    ax.set_title(f"{result['model']['arch']}, device {result['device']['name']} ({result['device']['label']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(y=0.15)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    lat = io.BytesIO()
    fig.savefig(lat, format="png", metadata=meta)
    plt.close(fig)

    labels = [p["label"] for p in result["links"]]
    names = [p["name"] for p in result["links"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    width = 0.38
    for i, mode in enumerate(("offload", "split")):
        by = {r["link"]: r for r in rows if r["mode"] == mode}
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        ax.bar(xs, [by[n]["link_bytes_median"] for n in names], width, color=COLORS[mode], alpha=0.35,
               label=f"{mode}: bytes on the link")
        ax.bar(xs, [by[n]["payload_bytes_median"] for n in names], width, color=COLORS[mode],
               label=f"{mode}: payload")
    ax.set_xticks(range(len(names)), labels)
    ax.set_ylabel("bytes per image (median)")
    ax.set_ylim(0, 1.3 * max([r["link_bytes_median"] for r in rows] + [r["payload_bytes_median"] for r in rows] + [1]))
    ax.set_title(f"bytes per mode (local sends none); JPEG q{result['jpeg_quality']}, wire {result['wire']}")
    ax.legend(fontsize=8, ncols=2, loc="upper center")
    fig.tight_layout()
    by_mode = io.BytesIO()
    fig.savefig(by_mode, format="png", metadata=meta)
    plt.close(fig)
    return lat.getvalue(), by_mode.getvalue()


def write_report(out: Path, result: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    lat, by = _plots(result)
    return [atomic_write_bytes(out / "split_latency.png", lat), atomic_write_bytes(out / "split_bytes.png", by),
            atomic_write_text(out / "split.md", markdown(result)),
            atomic_write_text(out / "split.json", json.dumps(result, indent=2, default=float) + "\n")]
