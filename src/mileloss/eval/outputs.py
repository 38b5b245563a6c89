"""Output folders of ``mileloss eval``, ``report`` and ``reproduce``: checked before any work, written atomically.

Each command may write into a new folder, an empty one, or one that holds only what the same command wrote
there before (recognised by ``owns``). Anything else (``--out .`` in a project, ``--out`` naming a file, a
folder of someone else's files) is an :class:`~mileloss.errors.OutputFolderError` with a one-line message;
nothing is overwritten or deleted that the command did not write.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from mileloss.errors import OutputFolderError

__all__ = ["check_output_folder", "create_output_folder", "read_json_object", "write_atomic"]

TEMP_SUFFIX = ".tmp"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def check_output_folder(path: str | Path, command: str, owns: Callable[[Path], bool], flag: str = "--out") -> Path:
    """Fail unless ``path`` is a folder ``command`` may write into; creates nothing.

    Args:
        path: the output folder (need not exist yet).
        command: e.g. ``"mileloss report"``, for the messages.
        owns: ``owns(entry)`` is True for an entry of the folder that ``command`` wrote itself.
        flag: the option that named ``path``.

    Raises:
        OutputFolderError: ``path`` (or a parent) is a file, is not writable, or holds entries ``owns`` rejects.
    """
    path = Path(path)
    where = f"{flag} {path}"
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{where} is a file, not a folder; give a folder path")
    if path.is_dir():
        try:
            entries = sorted(path.iterdir())
        except OSError as error:
            raise OutputFolderError(f"{where} cannot be listed ({error.strerror})") from error
        foreign = [entry.name for entry in entries if not owns(entry)]
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise OutputFolderError(f"{where} holds files that {command} did not write ({', '.join(foreign[:3])}"
                                    f"{more}); give a new or empty folder, nothing there is overwritten")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputFolderError(f"{where} is not writable")
        return path
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise OutputFolderError(f"{where} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{where} cannot be created: {parent} is not writable")
    return path


def create_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) and prove it writable with a probe file that is removed at once.

    Raises:
        OutputFolderError: naming the folder and the operating system's reason.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".mileloss-probe-"):
            pass
    except OSError as error:
        raise OutputFolderError(f"{flag} {path} cannot be written ({error.strerror or error})") from error
    return path


def is_temp_of(entry: Path, names: set[str] | frozenset[str]) -> bool:
    """True for the temporary file :func:`write_atomic` makes while writing one of ``names`` (left by a crash)."""
    return entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and any(
        entry.name.startswith(f".{name}.") for name in names)


def write_atomic(path: Path, data: bytes | str) -> Path:
    """Write ``data`` to a fresh temporary file beside ``path``, then rename it over ``path`` (never half-written).

    The temporary name is unique (``.<name>.<random>.tmp``), so it never replaces a file of the same name.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(payload)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def read_json_object(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file is not a readable JSON object (never raises)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
