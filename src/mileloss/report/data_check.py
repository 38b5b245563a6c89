"""Refuse to compare runs trained or evaluated on different data (corpus, tokenizer, vocabulary, token shards).

A run's training data is the identity ``mileloss train`` recorded in ``final/mileloss_run.json`` (``data``), so it
compares after the data folder is deleted; for older runs, the directory named there (``data_dir``) or in
``config.yaml`` (``data.dir``), identified now by :func:`mileloss.run_folder.data_identity`. Its evaluation data is
the identity ``mileloss eval`` stored in ``eval/perplexity.json`` (or, for older files, its ``data_dir`` read now).
Where neither can be read, the vocabulary size the run recorded is still compared, and the report says which runs
could not be checked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from mileloss.errors import MixedDataError
from mileloss.report.runs import RunRecord
from mileloss.run_folder import data_identity, describe_differences

__all__ = ["DataCheck", "MixedDataError", "check_same_data"]


@dataclasses.dataclass(frozen=True)
class DataCheck:
    """What :func:`check_same_data` found."""

    mixed: list[str]
    """One line per run whose training or evaluation data differs from the first run's."""
    unverified: list[str]
    """Runs whose training data directory could not be read (only their vocabulary size was compared)."""


def _identities(runs: Sequence[RunRecord]) -> tuple[list[dict], list[dict | None], list[str]]:
    cache: dict[str, dict] = {}

    def identity(directory: str) -> dict:
        key = str(Path(directory).resolve())
        if key not in cache:
            cache[key] = data_identity(directory)
        return dict(cache[key])

    trained, evaluated, unverified = [], [], []
    for run in runs:
        recorded = run.run_info.get("data") or {}  # recorded at training time; else the data folder read now
        train = dict(recorded) if recorded.get("readable") else identity(run.data_dir) if run.data_dir else {
            "readable": False, "vocab_size": None}
        if not train.get("readable"):
            train["vocab_size"] = run.vocab_size
            where = f"data directory {run.data_dir} is not readable" if run.data_dir else "no data directory recorded"
            unverified.append(f"{run.path} ({where})")
        trained.append(train)
        stored = (run.perplexity or {}).get("data")
        if isinstance(stored, dict):
            evaluated.append(stored)
        elif isinstance((run.perplexity or {}).get("data_dir"), str):
            evaluated.append(identity(run.perplexity["data_dir"]))
        else:
            evaluated.append(None)
    return trained, evaluated, unverified


def _first_difference(runs, identities, what: str) -> list[str]:
    """One line per run whose data differs from the first run that has an identity."""
    known = [(run, ident) for run, ident in zip(runs, identities, strict=True) if ident is not None]
    if not known:
        return []
    reference_run, reference = known[0]
    lines = []
    for run, ident in known[1:]:
        differences = describe_differences(reference, ident)
        if differences:
            lines.append(f"{reference_run.path} and {run.path} were {what} on different data: "
                         f"{', '.join(differences)}")
    return lines


def check_same_data(runs: Sequence[RunRecord], *, allow_mixed: bool = False) -> DataCheck:
    """Compare every run's training and evaluation data with the first run's.

    Raises:
        MixedDataError: on the first difference, unless ``allow_mixed`` (then the differences are returned, for a
            warning at the top of the report).
    """
    trained, evaluated, unverified = _identities(runs)
    mixed = _first_difference(runs, trained, "trained") + _first_difference(runs, evaluated, "evaluated")
    if mixed and not allow_mixed:
        raise MixedDataError(f"{mixed[0]}; their numbers do not compare (pass --allow-mixed-data to report them "
                             f"anyway, with a warning)")
    return DataCheck(mixed, unverified)
