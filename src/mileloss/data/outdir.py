"""The output folder of ``mileloss data``: a lock, a staging folder, and a replacement that loses nothing.

For ``--out DIR`` (a path ``PARENT/NAME``), ``mileloss data`` uses three siblings of ``DIR``:

* ``PARENT/.NAME.lock``: held with ``flock`` for the whole run, so two runs into the same ``DIR``
  cannot interleave: the second one stops at once with ``FolderBusyError``. The file is created
  complete (written under a temporary name, then ``link``-ed into place) and holds a small JSON record;
  a lock file left by a killed run is not held by anyone, and the next run takes it over.
* ``PARENT/.NAME.partial-PID``: everything is written here first. It holds ``.mileloss-partial``
  (``PARTIAL_MARKER``) from its creation until just before it becomes ``DIR``, so an unfinished
  folder is always recognisable, and ``load_manifest`` refuses it.
* ``PARENT/.NAME.old-PID``: a replaced ``DIR`` between the swap and its removal.

A run first takes the lock, then removes what killed runs into the same ``DIR`` left behind: staging
folders with the marker (or, if killed after the marker went, holding only what their manifest lists)
and replaced folders. Whatever ``DIR`` holds is a complete, published data set or nothing: it only ever
appears by the rename of a finished staging folder.

Which ``DIR`` may be used:

* absent or empty: written;
* a data directory written by ``mileloss data`` (a version 2 manifest, and nothing in the folder but
  ``manifest.json`` and the files the manifest lists: shards named ``split_NNNNN.bin`` of the recorded
  size, other files of the recorded sha256; no links): refused unless ``overwrite``; with
  ``overwrite`` replaced, and the old one's files removed one by one (only those the manifest lists);
* anything else (a file, a folder with other files, a version 1 data directory, the current folder or
  one above it, the root): refused, nothing touched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from mileloss.data.shards import MANIFEST_FILE, PARTIAL_MARKER, ShardManifest, file_sha256, read_manifest
from mileloss.errors import DataError, FolderBusyError, OutputFolderError

logger = logging.getLogger(__name__)

LOCK_TOOL = "mileloss data"
_MARKER_TEMP = PARTIAL_MARKER + ".tmp"  # the marker before its rename: a kill can leave only this


def resolve_out(out: str | os.PathLike) -> Path:
    """The absolute ``--out`` path with its parent's symlinks resolved; refuses the unusable ones.

    A symlink named as ``--out`` stands for the folder it points to (which must exist).

    Raises:
        OutputFolderError: empty, the root, the current folder or one of its parents, a file, or a
            dangling symlink.
    """
    text = os.fspath(out)
    if not str(text).strip():
        raise OutputFolderError("--out is empty; name the data folder to write")
    path = Path(os.path.abspath(Path(text).expanduser()))
    if path.is_symlink():
        target = path.resolve()
        if not target.is_dir():
            raise OutputFolderError(f"--out {text}: a symbolic link to {target}, which is not an existing folder")
        path = target
    if path == Path(path.anchor):
        raise OutputFolderError(f"--out {text}: the file system root cannot be a data folder")
    path = path.parent.resolve() / path.name
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        raise OutputFolderError(
            f"--out {text} is the current folder{'' if path == cwd else ' or holds it'}; "
            "name a new folder for the data (e.g. --out data/mine)"
        )
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"--out {text}: {path} is a file, not a folder; choose another --out")
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputFolderError(f"--out {text}: {ancestor} is a file, so no folder can be made inside it")
            break
    return path


def _os_error(error: OSError, doing: str) -> OutputFolderError:
    reason = error.strerror or type(error).__name__
    return OutputFolderError(f"cannot {doing}: {reason}{f' ({error.filename})' if error.filename else ''}")


# ---------------------------------------------------------------------------------------------------
# The lock


class OutputLock:
    """``flock`` on ``PARENT/.NAME.lock`` for the life of a ``mileloss data`` run; see the module docstring.

    Use as a context manager. Raises ``FolderBusyError`` if another live process holds it, and
    ``OutputFolderError`` if the lock file cannot be created or is not one of ours.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = out.with_name(f".{out.name}.lock")
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self) -> bytes:
        return (json.dumps({"tool": LOCK_TOOL, "pid": os.getpid(), "out": str(self.out)}) + "\n").encode()

    def acquire(self) -> None:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _os_error(error, f"create the folder {self.out.parent}") from error
        for _ in range(100):  # each retry follows another process's move; 100 in a row would be absurd
            fd, temporary = self._new_locked_file()
            try:
                os.link(temporary, self.path)
            except FileExistsError:
                os.close(fd)
            except OSError as error:
                os.close(fd)
                raise _os_error(error, f"create the lock file {self.path}") from error
            else:
                self._fd = fd
                return
            finally:
                os.unlink(temporary)
            self._take_over_stale()
        raise FolderBusyError(f"{self.path}: could not take the lock; another `mileloss data` keeps taking it")

    def _new_locked_file(self) -> tuple[int, str]:
        """A complete lock record under a temporary name, already flock-ed (so never seen unlocked)."""
        try:
            fd, temporary = tempfile.mkstemp(dir=self.out.parent, prefix=f".{self.out.name}.lock-")
        except OSError as error:
            raise _os_error(error, f"write in {self.out.parent}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, self._record())
            os.fsync(fd)
        except OSError as error:
            os.close(fd)
            os.unlink(temporary)
            raise _os_error(error, f"write the lock file {temporary}") from error
        return fd, temporary

    def _take_over_stale(self) -> None:
        """The lock file exists: refuse if a live process holds it; remove it if its owner died."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return  # its owner just removed it: try again
        except OSError as error:
            if error.errno == errno.ELOOP:
                message = f"{self.path} is a symbolic link, not a mileloss lock file; remove it"
                raise OutputFolderError(message) from error
            raise _os_error(error, f"read the lock file {self.path}") from error
        try:
            record = _read_record(fd)
            if record is None:
                raise OutputFolderError(
                    f"{self.path} exists and was not written by `mileloss data`; remove it or choose another --out"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderBusyError(
                    f"another `mileloss data` (pid {record.get('pid')}) is writing {self.out} right now; "
                    "wait for it to finish, or choose another --out"
                ) from None
            # We hold the lock of a dead owner. Remove the file if it is still the one at the path, then retry.
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    logger.info("taking over %s, left by pid %s, which is gone", self.path, record.get("pid"))
                    os.unlink(self.path)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)  # still ours (we hold the lock): nobody else can have replaced it
        os.close(self._fd)
        self._fd = None


def _read_record(fd: int) -> dict | None:
    """The JSON record of a lock or marker file, or ``None`` if it is not one of ours."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
        return None
    try:
        record = json.loads(os.read(fd, 4096).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("tool") == LOCK_TOOL else None


def _marker_record(path: Path) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _read_record(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# What is ours


_SHARD_FILE = re.compile(r"[a-z]+_\d{5}\.bin")


def owned_data_dir(folder: Path) -> tuple[ShardManifest | None, str]:
    """``(manifest, "")`` if ``folder`` is a data directory written by ``mileloss data``, else ``(None, why)``.

    Ours means: a version 2 manifest that parses, and every entry below ``folder`` is
    ``manifest.json``, a folder on the way to a listed file, or a listed file: a shard named like ours
    (``split_NNNNN.bin``) of the recorded size, or another file (token counts, tokenizer files, all
    small) of the recorded sha256. No symbolic links. Shards are not hashed (that would read the corpus).
    """
    try:
        manifest = read_manifest(folder)
    except DataError as error:
        return None, str(error)
    if manifest.version < 2:
        return None, f"{folder / MANIFEST_FILE} is a version 1 manifest, which does not list every file it owns"
    itemsize = manifest.dtype.itemsize
    shards = {shard.file: shard.num_tokens * itemsize for split in manifest.splits.values() for shard in split.shards}
    files = {info.file: info for info in manifest.files}
    folders = _folders_of([*shards, *files])
    where = folder / MANIFEST_FILE
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                return None, f"{path} is a symbolic link, which mileloss does not write"
            if stat.S_ISDIR(info.st_mode):
                if relative not in folders:
                    return None, f"{path} is a folder that {where} does not list"
            elif relative == MANIFEST_FILE:
                continue
            elif not stat.S_ISREG(info.st_mode):
                return None, f"{path} is not a regular file"
            elif relative in shards:
                if not _SHARD_FILE.fullmatch(relative) or info.st_size != shards[relative]:
                    return None, f"{path} is not a shard of {shards[relative]} bytes as {where} lists"
            elif relative in files:
                if info.st_size != files[relative].bytes or file_sha256(path) != files[relative].sha256:
                    return None, f"{path} differs from the file {where} lists (size or sha256)"
            else:
                return None, f"{path} is not one of the files {where} lists"
    return manifest, ""


def _folders_of(names) -> set[str]:
    """Every folder on the way to the files ``names`` (relative paths), as posix strings."""
    return {parent.as_posix() for name in names for parent in Path(name).parents} - {"."}


def remove_owned(folder: Path, manifest: ShardManifest) -> bool:
    """Delete the files ``manifest`` lists, their folders, then ``manifest.json``, then ``folder``.

    Nothing else is deleted: a file that appeared meanwhile stays (with the folders above it), and a
    warning says so. The manifest goes last, so a kill part way leaves a folder still recognisable as
    ours. Returns whether ``folder`` is gone.
    """
    listed = [shard.file for split in manifest.splits.values() for shard in split.shards]
    listed += [info.file for info in manifest.files]
    for name in listed:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    for name in sorted(_folders_of(listed), key=len, reverse=True):
        with contextlib.suppress(FileNotFoundError, OSError):
            (folder / name).rmdir()
    try:
        if any(entry.name != MANIFEST_FILE for entry in os.scandir(folder)):
            logger.warning("%s: left in place: it holds files mileloss did not write", folder)
            return False
        (folder / MANIFEST_FILE).unlink()
        folder.rmdir()
    except FileNotFoundError:
        pass
    return True


def _leftover_pattern(out: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")


def clean_leftovers(out: Path) -> list[Path]:
    """Remove the staging and replaced folders that killed runs into ``out`` left; call with the lock held.

    A staging folder goes if it holds our marker (everything in it was written by a run into ``out``),
    or nothing but the marker's temporary file (killed while writing it), or if it is a complete data
    directory of ours (killed after the marker went);
    a replaced folder goes if it is ours. Anything else is left, with a warning. Returns what was removed.
    """
    removed = []
    pattern = _leftover_pattern(out)
    for entry in os.scandir(out.parent):
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        path = Path(entry.path)
        record = _marker_record(path / PARTIAL_MARKER) if match.group(1) == "partial" else None
        if record is not None and record.get("out") == str(out):
            shutil.rmtree(path)
        elif {entry.name for entry in os.scandir(path)} <= {_MARKER_TEMP}:  # empty, or killed writing the marker
            with contextlib.suppress(FileNotFoundError):
                (path / _MARKER_TEMP).unlink()
            path.rmdir()
        else:
            manifest, why = owned_data_dir(path)
            if manifest is None or not remove_owned(path, manifest):
                logger.warning("%s: left in place: not recognisably ours (%s)", path, why or "files were added")
                continue
        logger.info("removed %s, left by an interrupted `mileloss data`", path)
        removed.append(path)
    return removed


def check_out(out: Path, overwrite: bool) -> ShardManifest | None:
    """What ``out`` holds now: ``None`` (absent or empty), or the manifest of a data directory we may replace.

    Raises:
        OutputFolderError: ``out`` is a file, a folder that is not ours, or ours without ``overwrite``.
    """
    try:
        info = os.lstat(out)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(info.st_mode):
        raise OutputFolderError(f"{out} is a file, not a folder; choose another --out")
    if not any(os.scandir(out)):
        return None
    manifest, why = owned_data_dir(out)
    if manifest is None:
        raise OutputFolderError(
            f"{out} exists and is not a data folder written by `mileloss data` ({why}); "
            "nothing was changed: choose another --out"
        )
    if not overwrite:
        raise OutputFolderError(
            f"{out} already holds mileloss data (corpus {manifest.corpus!r}, vocab_size {manifest.vocab_size}); "
            "pass --overwrite to replace it, or choose another --out"
        )
    return manifest


# ---------------------------------------------------------------------------------------------------
# Staging and publishing


def make_staging(out: Path) -> Path:
    """``PARENT/.NAME.partial-PID`` with the marker inside, written first (complete: temp file + rename)."""
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        staging.mkdir()
    except OSError as error:
        raise _os_error(error, f"create the staging folder {staging}") from error
    try:
        temporary = staging / _MARKER_TEMP
        with open(temporary, "x") as handle:
            handle.write(json.dumps({"tool": LOCK_TOOL, "pid": os.getpid(), "out": str(out)}) + "\n")
        os.rename(temporary, staging / PARTIAL_MARKER)
    except BaseException as error:  # a SIGTERM (SystemExit) or a full disk while the marker is written
        discard_staging(staging)
        if isinstance(error, OSError):
            raise _os_error(error, f"create the staging folder {staging}") from error
        raise
    return staging


def discard_staging(staging: Path) -> None:
    """Remove a staging folder of this run (it holds nothing but what this run wrote)."""
    shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Make the finished ``staging`` folder ``out``; call with the lock held.

    ``out`` is checked again here (it may have changed during the run). A replaced data directory is
    renamed aside first, then ``staging`` renamed to ``out``, then the old files removed one by one.
    """
    replaced = check_out(out, overwrite)
    _fsync_tree(staging)
    (staging / PARTIAL_MARKER).unlink()
    if replaced is None:
        with contextlib.suppress(FileNotFoundError):
            out.rmdir()  # an empty folder (rmdir refuses anything else)
        os.rename(staging, out)
    else:
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(staging, out)
        remove_owned(old, replaced)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
