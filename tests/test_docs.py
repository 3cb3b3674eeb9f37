"""The documentation lives in the repository: nothing cites the design notes a user who clones the project does not
have, README links every page of docs/ (and every link resolves), and the README's path from the demo's output to
serve, run-head and bench split is made of commands the CLI accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from bottlefit.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The notes outside the repo, by folder and by file name (built from pieces so this file does not match itself).
OUTSIDE = re.compile(r"\b" + "shared" + r"/|\b(DESIGN|BOTTLEFIT|STACK|TENSORRT|LAYOUT)\.md\b")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _cited_files() -> list[Path]:
    files = [README, ROOT / "pyproject.toml", ROOT / "run", *DOCS.glob("*.md")]
    for folder in ("bottlefit", "tests", "bench", "examples"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".sh", ".yml",
                                                                                         ".yaml", ".toml", ".txt")]
    return files


def test_nothing_cites_the_notes_outside_the_repository() -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in _cited_files()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert len(_cited_files()) > 100 and hits == []


def test_readme_links_every_docs_page_and_every_link_resolves() -> None:
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert {"architecture.md", "wire.md", "reference-semantics.md", "emulation.md", "tensorrt.md",
            "checkpoints.md"} <= set(pages)
    linked = {m for m in LINK.findall(README.read_text()) if m.startswith("docs/")}
    assert sorted(Path(m).name for m in linked if m.endswith(".md")) == pages
    for source in [README, *DOCS.glob("*.md")]:
        for target in LINK.findall(source.read_text()):
            if "://" not in target:
                assert (source.parent / target).exists(), f"{source.relative_to(ROOT)} links {target}"


def _after_the_demo() -> list[list[str]]:
    section = README.read_text().split("## After the demo", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_readme_path_from_the_demo_parses() -> None:
    """Each command of the path from `./run`'s output: a real subcommand, flags it takes, the folders the demo
    writes (out/demo/export, out/demo/images) and what the demo's last line names."""
    commands = _after_the_demo()
    assert [c[:2] for c in commands] == [["./run", "serve"], ["./run", "run-head"], ["./run", "run-head"],
                                         ["./run", "bench"], ["./run", "profiles"]]
    for argv in commands:
        args = build_parser(argv[1]).parse_args(argv[1:])
        assert callable(args.func)
    serve = build_parser("serve").parse_args(commands[0][1:])
    run_head = build_parser("run-head").parse_args(commands[1][1:])
    assert (serve.out, serve.http_port, run_head.server) == ("out/demo/export", 8000, "http://127.0.0.1:8000")
    assert (run_head.dir, run_head.images) == ("out/demo/export/onnx", ["out/demo/images/*.png"])
    bench = build_parser("bench").parse_args(commands[3][1:])
    assert bench.demo_out == "out/demo"  # the demo's own folder: the bench reads its export from there


def test_readme_path_matches_what_the_demo_writes() -> None:
    """The demo's defaults and its last line name the same folders as the README's commands."""
    from bottlefit.demo import N_IMAGES

    p = build_parser("demo").parse_args(["demo"])
    assert p.out == "out/demo"
    text = README.read_text().split("## After the demo", 1)[1].split("\n## ", 1)[0]
    words = {4: "four", 5: "five", 6: "six", 8: "eight", 10: "ten", 12: "twelve", 16: "sixteen"}
    assert f"{words.get(N_IMAGES, N_IMAGES)} of the" in text and "images/<i>-digit<label>.png" in text


def test_the_jetson_python_is_the_same_in_the_readme_the_profiles_and_the_bundle_readme() -> None:
    """The Python a Jetson board runs the bundle's scripts with is the one its JetPack ships (profiles.py's
    board_python): the top README lists it per JetPack and each bundle's README names its own."""
    from bottlefit.targets.jetson import JetsonOptions, _readme, resolve
    from bottlefit.targets.jetson.profiles import PROFILES

    top = " ".join(README.read_text().split())
    for p in PROFILES:
        assert f"{p.board_python} on {'' if p.jetpack[0] != '4.6' else 'JetPack '}{'/'.join(p.jetpack)} (" in top, p
        assert p.name in top.split(f"{p.board_python} on ", 1)[1].split(")", 1)[0]
        text = _readme(resolve(JetsonOptions(profile=p.name, jetpack=p.jetpack[0])), ["head.onnx"])
        assert f"JetPack {p.jetpack[0]}, whose own `python3` ({p.board_python})" in " ".join(text.split())
        assert "venv" in text and "scp -r OUT/jetson " in text and "python3 client.py" in text
        assert "Python 3.6 or newer" in " ".join(text.split())
