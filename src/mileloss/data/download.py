"""Download one pinned file from a package index, checking its size and sha256 before anyone opens it.

Nothing here runs code from what it downloads: no ``pip download`` (which builds an sdist's metadata,
running its build backend, before any hash is checked), no install, no import. The steps are:

1. the index page of the project (PEP 503 HTML or PEP 691 JSON) at ``$PIP_INDEX_URL`` (default
   ``https://pypi.org/simple/``), parsed as data, gives the URL of the exact file name;
2. the file is streamed to a temporary file beside its destination, hashed as it arrives, and cut off
   as soon as it grows past the pinned size;
3. only a file of the pinned size and sha256 is renamed into place; any other is deleted, and
   ``CorpusFetchError`` says which URL gave which digest.

``$PIP_CERT`` (else ``$SSL_CERT_FILE``) names the CA bundle, and the usual ``https_proxy`` variables are
honoured by ``urllib``. Only ``http``/``https`` URLs are followed; with a pinned digest, even a plain
``http`` mirror cannot substitute the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import html.parser
import http.client
import json
import logging
import os
import re
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mileloss.errors import CorpusFetchError

logger = logging.getLogger(__name__)

DEFAULT_INDEX_URL = "https://pypi.org/simple/"
MAX_INDEX_PAGE_BYTES = 32 * 2**20
TIMEOUT_SECONDS = 60
READ_BYTES = 2**20
_JSON_SIMPLE = "application/vnd.pypi.simple.v1+json"


def index_url() -> str:
    """``$PIP_INDEX_URL`` if set, else PyPI's simple index."""
    return os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX_URL


def _ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or None
    return ssl.create_default_context(cafile=cafile)


def _open(url: str, accept: str | None = None):
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise CorpusFetchError(f"{url}: only http and https URLs are fetched, not {scheme or 'a bare path'!r}")
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=_ssl_context())
    except urllib.error.HTTPError as error:
        raise CorpusFetchError(f"{url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise CorpusFetchError(f"{url}: cannot connect ({reason}); is the network or PIP_INDEX_URL right?") from error


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [value for name, value in attrs if name == "href" and value]


def _normalized(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()  # PEP 503


def file_url(project: str, filename: str, index: str | None = None) -> str:
    """The URL of ``filename`` on the index page of ``project`` (without any ``#sha256=`` fragment).

    Raises:
        CorpusFetchError: the page cannot be fetched or parsed, or does not list ``filename``.
    """
    page_url = (index or index_url()).rstrip("/") + "/" + _normalized(project) + "/"
    try:
        with _open(page_url, accept=f"{_JSON_SIMPLE}, text/html;q=0.5") as response:
            body = response.read(MAX_INDEX_PAGE_BYTES + 1)
            content_type = response.headers.get_content_type()
            page_url = response.geturl()  # after redirects: relative links resolve against this
    except (OSError, http.client.HTTPException) as error:
        raise CorpusFetchError(f"{page_url}: reading the index page failed ({error})") from error
    if len(body) > MAX_INDEX_PAGE_BYTES:
        raise CorpusFetchError(f"{page_url}: index page larger than {MAX_INDEX_PAGE_BYTES} bytes")
    try:
        text = body.decode("utf-8")
        if content_type == _JSON_SIMPLE:
            files = json.loads(text).get("files", [])
            hrefs = [entry["url"] for entry in files if isinstance(entry, dict) and isinstance(entry.get("url"), str)]
        else:
            parser = _Links()
            parser.feed(text)
            hrefs = parser.hrefs
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise CorpusFetchError(f"{page_url}: not a readable package index page ({error})") from error
    for href in hrefs:
        url = urllib.parse.urljoin(page_url, href)
        parts = urllib.parse.urlsplit(url)
        if urllib.parse.unquote(parts.path.rsplit("/", 1)[-1]) == filename:
            return urllib.parse.urlunsplit(parts._replace(fragment=""))
    raise CorpusFetchError(f"{page_url}: the index does not list {filename}")


def download_pinned(url: str, destination: Path, sha256: str, size: int) -> Path:
    """Stream ``url`` into ``destination`` if, and only if, it is ``size`` bytes with digest ``sha256``.

    The bytes go to a temporary file beside ``destination`` (same folder, so the final rename is
    atomic); on any failure the temporary file is removed and ``destination`` is left as it was.

    Raises:
        CorpusFetchError: the download fails, is longer or shorter than ``size``, or its sha256 differs.
    """
    destination = Path(destination)
    fd, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.part-")
    try:
        digest, received = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as handle, _open(url) as response:
            while block := response.read(READ_BYTES):
                received += len(block)
                if received > size:
                    raise CorpusFetchError(f"{url}: more than the expected {size} bytes; refusing the download")
                digest.update(block)
                handle.write(block)
        if received != size:
            raise CorpusFetchError(f"{url}: {received} bytes, expected {size}; the download was cut short")
        if digest.hexdigest() != sha256:
            raise CorpusFetchError(
                f"{url}: sha256 {digest.hexdigest()} is not the pinned {sha256}; the file was not kept"
            )
        os.replace(temporary, destination)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError | http.client.HTTPException):  # connection reset, timeout, disk full
            raise CorpusFetchError(f"{url}: download failed ({type(error).__name__}: {error})") from error
        raise
    logger.info("downloaded %s (%d bytes, sha256 %s)", destination.name, size, sha256)
    return destination
