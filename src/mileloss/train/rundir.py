"""The run folder (``run.out``): who may write it, and what a fresh run, ``--resume`` or ``--overwrite`` finds there.

One trainer at a time: the main process holds ``RUN_DIR/.mileloss-train.lock`` for the whole run. The lock is
created with ``O_CREAT | O_EXCL`` and holds ``{"pid", "host", "started", "token"}``. A second trainer aiming at
the same folder stops with :class:`FolderBusyError` naming the holder. A lock left by a killed trainer (its pid
is gone, same host) is taken over with a warning; a lock from another host is never taken over (its pid cannot be
checked here): the message says to delete it if that trainer is gone.

What a run may find in ``run.out``:

* absent or empty: a fresh run starts;
* anything else: a fresh run is refused (:class:`RunFolderNotEmptyError`) unless ``--overwrite`` is given;
  ``--resume`` continues from the newest complete, verified checkpoint (:class:`NoCheckpointError` if there is
  none);
* with ``--overwrite``, the folder must hold only what ``mileloss train`` writes (``config.yaml`` of a mileloss
  config, ``metrics.jsonl``, ``metrics.csv``, ``checkpoints/``, ``tensorboard/``, ``final/``, each holding only
  the names mileloss writes there, no symbolic links; in ``checkpoints/`` also the sharded checkpoint folders
  ``step_N/`` and the staging folders of killed writers, holding only the files of a sharded checkpoint); those are
  removed one by one before the new run starts.
  Anything else (an ``eval/`` folder, a file of the user's) refuses the overwrite before anything is removed.

``run.out`` may not be a file, the current folder, one of its parents, or the root; a leading ``~`` is the home
folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import stat
import time
import uuid
from pathlib import Path

import torch
import yaml

import mileloss.run_folder as layout
from mileloss.errors import FolderBusyError, NoCheckpointError, OutputFolderError, RunFolderNotEmptyError
from mileloss.train.checkpoint import _NAME, _RECORD_NAME, _TEMPORARY, all_checkpoint_steps, incomplete_steps
from mileloss.train.dcp import DIR_NAME as _SHARDED
from mileloss.train.dcp import STAGING as _SHARDED_STAGING
from mileloss.train.dcp import is_own_content as _is_sharded_content

logger = logging.getLogger(__name__)

__all__ = ["FolderBusyError", "NoCheckpointError", "OutputFolderError", "RunFolderNotEmptyError", "RunLock",
           "check_out_path", "claim_run_folder", "foreign_entries"]

_TOP_FILES = {layout.CONFIG, layout.METRICS_JSONL, layout.METRICS_CSV}
# what save_pretrained (model and tokenizer) and export_final write into final/
_FINAL_NAMES = (
    re.compile(r"^(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab)\.json$"),
    re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$"),
    re.compile(r"^model\.safetensors\.index\.json$"),
    re.compile(r"^pytorch_model(-\d{5}-of-\d{5})?\.bin$"),
    re.compile(r"^pytorch_model\.bin\.index\.json$"),
    re.compile(r"^(merges\.txt|tokenizer\.model|chat_template\.jinja)$"),
    re.compile(rf"^{re.escape(layout.RUN_INFO)}$"),
)
_SUBDIRS = {layout.CHECKPOINTS: (_NAME, _RECORD_NAME, _TEMPORARY), layout.FINAL: _FINAL_NAMES,
            layout.TENSORBOARD: (re.compile(r"^events\.out\.tfevents\..+$"),)}
_STALE_LOCK = re.compile(rf"^{re.escape(layout.LOCK)}\.stale-\d+-[0-9a-f]{{8}}$")  # moved aside by a killed takeover


def check_out_path(out: str | os.PathLike) -> Path:
    """``run.out`` as a path, refusing a file, the root, and the current folder or any folder above it.

    Raises:
        OutputFolderError: naming ``run.out`` and its value.
    """
    path = Path(out).expanduser()  # "~/runs/x" from a YAML file means the home folder, not a folder named "~"
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise OutputFolderError(f"run.out={str(out)!r} is the filesystem root; name a run folder such as runs/NAME")
    cwd = Path.cwd().resolve()
    if cwd == resolved or resolved in cwd.parents:
        raise OutputFolderError(f"run.out={str(out)!r} is the current folder or one above it ({resolved}); a run "
                             f"folder is written and pruned by mileloss: name one such as runs/NAME")
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"run.out={str(out)!r} is a file, not a folder; choose another run.out")
    for parent in resolved.parents:
        if parent.exists() and not parent.is_dir():
            raise OutputFolderError(f"run.out={str(out)!r}: {parent} is a file, not a folder; choose another run.out")
    return path


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a reused pid from the lock's holder."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` runs (and, given its recorded kernel ``start`` time, is the same process)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (a pid beyond C long cannot be one)
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """The run folder's lock file (see the module docstring). Use :meth:`acquire` / :meth:`release`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / layout.LOCK
        self.token = uuid.uuid4().hex
        self.held = False

    def _content(self) -> dict:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "start": _process_start(pid), "started": time.time(),
                "token": self.token, "tool": "mileloss train"}

    def _read(self, path: Path | None = None) -> dict | None:
        """The lock's record; ``None`` if it is gone; ``{}`` if it is empty or unreadable."""
        try:
            text = (path or self.path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return {}
        try:
            record = json.loads(text)
        except ValueError:
            return {}
        if not isinstance(record, dict) or not isinstance(record.get("pid"), int) or not isinstance(
                record.get("host"), str):
            return {}
        return record

    def _holder(self) -> dict | None:
        """The record of the lock that exists now, waiting briefly for one being written."""
        for _ in range(20):
            record = self._read()
            if record != {}:
                return record
            time.sleep(0.1)  # created with O_EXCL but not yet written by its owner
        raise FolderBusyError(
            f"the lock {self.path} is empty or unreadable (a trainer killed while taking it?); if no trainer is "
            f"writing {self.path.parent}, delete the lock and run again"
        )

    def _describe(self, record: dict) -> str:
        started = record.get("started")
        when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(
            started, (int, float)) else ""
        return f"pid {record['pid']} on {record['host']}{when}"

    def acquire(self) -> None:
        """Create the lock, or take over a stale one of this host.

        Raises:
            FolderBusyError: another live trainer (or one on another host) holds it.
            OutputFolderError: the folder is not writable.
        """
        host = socket.gethostname()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if holder["host"] != host:
                    raise FolderBusyError(
                        f"{self.path.parent} is locked by mileloss train {self._describe(holder)} (lock "
                        f"{self.path}); if that trainer is gone, delete the lock and run again"
                    ) from None
                if _alive(holder["pid"], holder.get("start")):
                    raise FolderBusyError(
                        f"{self.path.parent} is in use by mileloss train {self._describe(holder)}; wait for it to "
                        f"finish or stop it (lock {self.path})"
                    ) from None
                self._take_over(holder)
                continue
            except OSError as error:
                raise OutputFolderError(f"cannot write in run.out {self.path.parent}: {error.strerror}") from None
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(self._content()) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            return
        raise FolderBusyError(f"could not take the lock {self.path}: other trainers keep taking it")

    def _take_over(self, stale: dict) -> None:
        """Move the stale lock aside; if what was moved is not the lock judged stale, put it back and refuse."""
        aside = self.path.with_name(f"{layout.LOCK}.stale-{os.getpid()}-{self.token[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else moved it: try again from the start
        moved = self._read(aside)
        if moved is not None and moved.get("token") != stale.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # a live lock taken over by another trainer meanwhile: restore it
            aside.unlink(missing_ok=True)
            raise FolderBusyError(f"{self.path.parent} was just locked by another trainer "
                                     f"({self._describe(moved)})")
        aside.unlink(missing_ok=True)
        logger.warning("taking over the stale lock %s of mileloss train %s (that process is gone)", self.path,
                       self._describe(stale))

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        if self.held:
            record = self._read()
            if record and record.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            self.held = False


def _is_mileloss_config(path: Path) -> bool:
    from mileloss.train.config import SECTIONS

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and bool(raw) and set(raw) <= set(SECTIONS)


def _is_mileloss_metrics(path: Path) -> bool:
    """Every line a metric line, but maybe the last after some that are (a kill may cut it short)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    lines, other = layout.parse_metric_lines(text)
    return not other or (other == list(filter(str.strip, text.splitlines()))[-1:] and bool(lines))


def _is_mileloss_csv(path: Path) -> bool:
    from mileloss.train.metrics import TRAIN_FIELDS

    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().rstrip("\r\n") == ",".join(TRAIN_FIELDS)
    except (OSError, UnicodeDecodeError):
        return False


_TOP_CHECKS = {layout.CONFIG: _is_mileloss_config, layout.METRICS_JSONL: _is_mileloss_metrics,
               layout.METRICS_CSV: _is_mileloss_csv}


def foreign_entries(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """Split what ``run_dir`` holds into (written by mileloss train, anything else); links count as foreign.

    The first list holds files, then the folders that hold them, so removing it in order empties the folders.
    """
    ours_files: list[Path] = []
    ours_dirs: list[Path] = []
    foreign: list[Path] = []
    for entry in sorted(run_dir.iterdir()):
        mode = entry.lstat().st_mode
        if entry.name == layout.LOCK:
            continue
        if stat.S_ISREG(mode) and entry.name in _TOP_FILES and _TOP_CHECKS[entry.name](entry):
            ours_files.append(entry)
        elif stat.S_ISREG(mode) and (layout.is_temp_of(entry, _TOP_FILES) or _STALE_LOCK.match(entry.name)):
            ours_files.append(entry)
        elif stat.S_ISDIR(mode) and entry.name in _SUBDIRS:
            patterns = _SUBDIRS[entry.name]
            for child in sorted(entry.iterdir()):
                if stat.S_ISREG(child.lstat().st_mode) and (any(p.match(child.name) for p in patterns) or (
                        entry.name == layout.FINAL and layout.is_temp_of(child, {layout.RUN_INFO}))):
                    ours_files.append(child)
                elif entry.name == layout.CHECKPOINTS and stat.S_ISDIR(child.lstat().st_mode) and (
                        _SHARDED.match(child.name) or _SHARDED_STAGING.match(child.name)):
                    inside = sorted(child.iterdir())
                    mine = [f for f in inside if stat.S_ISREG(f.lstat().st_mode) and _is_sharded_content(f.name)]
                    ours_files.extend(mine)
                    foreign.extend(f for f in inside if f not in mine)
                    ours_dirs.append(child)
                else:
                    foreign.append(child)
            ours_dirs.append(entry)
        else:
            foreign.append(entry)
    return ours_files + ours_dirs, foreign


def _listing(paths: list[Path], run_dir: Path, limit: int = 4) -> str:
    names = [str(p.relative_to(run_dir)) + ("/" if p.is_dir() and not p.is_symlink() else "") for p in paths]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _prepare_contents(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """With the lock held: check what ``run_dir`` holds against the mode, and clear it for ``overwrite``."""
    entries = [e for e in sorted(run_dir.iterdir()) if e.name != layout.LOCK]
    if resume:
        directory = run_dir / layout.CHECKPOINTS
        if not all_checkpoint_steps(directory):
            incomplete = incomplete_steps(directory)
            found = (f" (step_*.pt of steps {incomplete} have no checksum record: incomplete, or written by an "
                     f"older mileloss)") if incomplete else ""
            what = "start a fresh run without --resume" + (" and with --overwrite" if entries else "")
            raise NoCheckpointError(f"--resume: no complete checkpoint in {directory}{found}; {what}")
        return
    if not entries:
        return
    if not overwrite:
        raise RunFolderNotEmptyError(
            f"run.out {run_dir} already holds {_listing(entries, run_dir)}: continue that run with --resume, "
            f"replace it with --overwrite, or choose another run.out"
        )
    ours, foreign = foreign_entries(run_dir)
    if foreign:
        raise RunFolderNotEmptyError(
            f"--overwrite: run.out {run_dir} holds files mileloss train did not write ({_listing(foreign, run_dir)}); "
            f"nothing was removed: move them away or choose another run.out"
        )
    for path in ours:
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    logger.warning("--overwrite: removed the previous run's %d files from %s", len(ours), run_dir)


def claim_run_folder(run_dir: Path, context, device: torch.device, resume: bool, overwrite: bool) -> RunLock | None:
    """Create ``run_dir``, lock it and check it for the run's mode; on rank 0 only, agreed by every rank.

    Returns the held lock on rank 0 (release it when the run ends), ``None`` on other ranks.

    Raises:
        OutputFolderError and subclasses: the folder cannot be used (on every rank).
    """
    if resume and overwrite:
        raise OutputFolderError("--resume and --overwrite contradict each other: choose one")
    if resume and not run_dir.is_dir():
        raise NoCheckpointError(f"--resume: run.out {run_dir} does not exist; start a fresh run without --resume")
    lock, failure = None, None
    if context.is_main:
        try:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise OutputFolderError(f"cannot create run.out {run_dir}: {error.strerror}") from None
            lock = RunLock(run_dir)
            lock.acquire()
            _prepare_contents(run_dir, resume, overwrite)
        except BaseException as error:
            if lock is not None:
                lock.release()
            failure = error
    if context.world_size > 1:  # every rank learns whether rank 0 could claim the folder
        flag = torch.tensor([0.0 if failure is None else 1.0], device=device)
        if context.all_reduce_sum(flag).item() > 0 and failure is None:
            raise OutputFolderError(f"rank 0 could not claim run.out {run_dir} (its log says why)")
    if failure is not None:
        raise failure
    return lock
