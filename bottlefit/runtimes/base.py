"""The one runner contract every runtime follows (modelled on Polygraphy's ``backend/base/runner.py``).

A runner loads one artifact file and runs it: named arrays in, named arrays out. The public :meth:`Runner.infer`
checks the inputs once, for every runtime alike (the same bad input gets the same one-line
:class:`~bottlefit.errors.UserError`, naming the file, the input, what was expected and what was given), times the
run, and hands the checked arrays to the runtime's own :meth:`Runner.infer_impl`. A runtime implements only its
loading (in ``__init__``, after calling ``super().__init__(path)``), its specs and ``infer_impl``.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from bottlefit.errors import EnvironmentProblem, UserError


class RuntimeUnavailable(EnvironmentProblem):
    """The runtime's Python package (or its hardware) is not present here: the machine's problem, exit code 3."""


@dataclass(frozen=True)
class IOSpec:
    """One input or output of a loaded artifact as its runtime sees it.

    ``shape``: -1 for a dynamic dimension; None where the runtime cannot tell the rank (nothing is checked).
    ``dtype``: None where numpy has no such type (e.g. bfloat16; nothing is checked)."""

    name: str
    shape: tuple[int, ...] | None
    dtype: np.dtype | None

    def describe(self) -> str:
        """e.g. ``float32[1,3,-1,-1]``."""
        dtype = self.dtype.name if self.dtype is not None else "any"
        dims = "?" if self.shape is None else ",".join(str(d) for d in self.shape)
        return f"{dtype}[{dims}]"

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        if self.shape is None:
            return True
        return len(shape) == len(self.shape) and all(w < 0 or w == g for w, g in zip(self.shape, shape, strict=True))


def _given(arr: np.ndarray) -> str:
    return f"{arr.dtype.name}[{','.join(str(d) for d in arr.shape)}]"


class Runner(abc.ABC):
    """One loaded artifact in one runtime.

    Subclasses set the class attribute ``name`` (the runtime's name in :func:`bottlefit.runtimes.get_runner`),
    call ``super().__init__(path)`` once their runtime is importable (so a missing runtime is reported before a
    missing file), then load the file and implement :meth:`input_specs`, :meth:`output_specs` and
    :meth:`infer_impl`."""

    name: ClassVar[str]

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        #: wall time of the last :meth:`infer_impl` call, in milliseconds (None before the first)
        self.last_inference_ms: float | None = None
        if not self.path.is_file():
            if self.path.is_dir():
                raise UserError(f"{self.path}: is a directory; the {self.name} runner needs the artifact file")
            raise UserError(f"{self.path}: {self.name} artifact not found (no such file)")

    # -- what a runtime implements

    @abc.abstractmethod
    def input_specs(self) -> dict[str, IOSpec]:
        """The inputs by their canonical names, in the runtime's order."""

    @abc.abstractmethod
    def output_specs(self) -> dict[str, IOSpec]:
        """The outputs by their names, in the runtime's order."""

    @abc.abstractmethod
    def infer_impl(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. ``inputs`` holds exactly the canonical input names, each a C-contiguous array whose dtype
        and static dimensions match :meth:`input_specs`. Returns every output by name (arrays the caller owns)."""

    def _resolve_alias(self, name: str) -> str:
        """The canonical input name for a name a caller may also use (e.g. a LiteRT signature name);
        ``name`` itself when it is no alias."""
        return name

    # -- the same for every runtime

    @property
    def input_names(self) -> list[str]:
        return list(self.input_specs())

    @property
    def output_names(self) -> list[str]:
        return list(self.output_specs())

    def infer(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Every output by name for the named inputs (canonical names or their aliases).

        Raises UserError (one line) for a missing or unknown input, a wrong dtype or a wrong static dimension."""
        feed = self._checked(inputs)
        start = time.perf_counter()
        outputs = self.infer_impl(feed)
        self.last_inference_ms = (time.perf_counter() - start) * 1e3
        return outputs

    def _checked(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        specs = self.input_specs()
        expected = ", ".join(f"{n!r} {s.describe()}" for n, s in specs.items())
        given_as: dict[str, str] = {}
        for key in inputs:
            name = self._resolve_alias(key)
            if name not in specs:
                raise UserError(f"{self.path}: unknown input {key!r}; it takes {expected}")
            if name in given_as:
                raise UserError(f"{self.path}: input {name!r} given twice (as {given_as[name]!r} and {key!r})")
            given_as[name] = key
        missing = [n for n in specs if n not in given_as]
        if missing:
            raise UserError(f"{self.path}: missing input {missing[0]!r} ({specs[missing[0]].describe()}); "
                            f"given {sorted(inputs) or 'none'}; it takes {expected}")
        feed: dict[str, np.ndarray] = {}
        for name, spec in specs.items():
            key = given_as[name]
            label = repr(name) if key == name else f"{name!r} (given as {key!r})"
            arr = np.asarray(inputs[key])
            if spec.dtype is not None and arr.dtype != spec.dtype:
                raise UserError(f"{self.path}: input {label} has the wrong dtype: expected {spec.describe()}, "
                                f"given {_given(arr)}")
            if not spec.accepts_shape(tuple(arr.shape)):
                raise UserError(f"{self.path}: input {label} has the wrong shape: expected {spec.describe()}, "
                                f"given {_given(arr)}")
            feed[name] = np.ascontiguousarray(arr)
        return feed

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"
