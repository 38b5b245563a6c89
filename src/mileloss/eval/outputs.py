"""Output folders of ``mileloss eval``, ``report`` and ``reproduce``: checked before any work, written atomically.

Each command may write into a new folder, an empty one, or one that holds only what the same command wrote
there before (recognised by ``owns``). Anything else (``--out .`` in a project, ``--out`` naming a file, a
folder of someone else's files) is an :class:`~mileloss.errors.OutputFolderError` with a one-line message;
nothing is overwritten or deleted that the command did not write.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from mileloss.errors import OutputFolderError

__all__ = ["check_output_folder", "create_output_folder"]


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
