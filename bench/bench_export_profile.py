"""Where an export's time and memory go: wall seconds, CPU seconds and peak RSS of each stage
(bottlefit.exportprofile does the work; see its docstring for the method).

    PYTHONPATH=. .venv/bin/python bench/bench_export_profile.py [--json FILE] [--check BASELINE] -- \\
        /work/ckpt/r152v2_12.pt --target jetson,rpi --profile orin --out /tmp/o

``--check BASELINE`` (a ``--json`` file of an earlier run of the same command): exit 1 when the total CPU seconds,
a stage's CPU seconds (stages of at least 2 CPU s in the baseline) or the peak RSS grew beyond ``--margin`` (default
50% for CPU, a third of it for RSS).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bottlefit.exportprofile import profile, regressions, render


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: bench_export_profile.py [--json FILE] [--check BASELINE] [--margin M] -- EXPORT ARGS",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--md", help="write the table here")
    p.add_argument("--check", help="a --json file to compare with: exit 1 on a regression")
    p.add_argument("--margin", type=float, default=0.5)
    opts = p.parse_args(argv[:cut])
    d = profile(argv[cut + 1:])
    table = render(d)
    print(table)
    if opts.json:
        Path(opts.json).write_text(json.dumps(d, indent=2) + "\n")
    if opts.md:
        Path(opts.md).write_text(table)
    if d["exit_code"] not in (0, 1):
        return int(d["exit_code"])
    if opts.check:
        bad = regressions(d, json.loads(Path(opts.check).read_text()), opts.margin)
        for b in bad:
            print(f"REGRESSION: {b}")
        if bad:
            return 1
        print(f"no regression beyond {opts.margin:.0%} CPU against {opts.check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
