"""Command-line spellings: one flag name per concept in every command, and the old spellings of renamed flags
kept working for one release (README: "Renamed flags")."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def warn_renamed(old: str, new: str) -> None:
    """The one line a deprecated spelling prints on stderr (it still takes effect)."""
    print(f"bottlefit: warning: {old} is deprecated; use {new}", file=sys.stderr, flush=True)


class _Renamed(argparse.Action):
    """The old spelling of a renamed flag: stores its value where the new one does, after one warning line."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        warn_renamed(option_string or self.option_strings[0], self.new)
        setattr(namespace, self.dest, values)


def add_renamed(parser: Any, new: str, *old: str, **kwargs: Any) -> argparse.Action:
    """``parser.add_argument(new, **kwargs)`` (a flag that takes a value), plus each spelling in ``old`` as a
    deprecated alias hidden from help: same destination, same type and choices, one warning line when used. The
    spellings exclude each other (given both: a usage error naming them); a required flag is required in either."""
    parser = parser.add_mutually_exclusive_group(required=kwargs.pop("required", False))
    action = parser.add_argument(new, **kwargs)
    alias = {k: v for k, v in kwargs.items() if k in ("type", "choices", "metavar", "nargs")}
    for spelling in old:
        parser.add_argument(spelling, dest=action.dest, action=_Renamed, new=new, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS, **alias)
    return action
