"""A small reader for R's serialization format, enough to pull text out of an R data package.

R packages keep their data sets in a *lazy-load database*: ``data/Rdata.rdx`` (a gzip-compressed
serialized index, ``variables`` name -> (offset, length)) and ``data/Rdata.rdb`` (one compressed,
serialized object per record). Objects are serialized in XDR (big-endian) format: a header, then
items, each introduced by a 32-bit flags word (type in the low 8 bits, "has attributes" bit 9, "has
tag" bit 10, encoding levels from bit 12) followed by the type's payload.

Only the types a data package of text needs are read: NULL, symbols, pairlists (attributes), strings
and logical/integer/double/character/generic vectors. Anything else raises ``RDataError``, so the
reader never guesses. This is a reader of the format, written from its description in R's
``serialize.c`` documentation; it executes nothing.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field

from mileloss.errors import RDataError

# SEXP type codes used below (R internals manual, "Serialization formats").
NILSXP, SYMSXP, LISTSXP, CHARSXP = 0, 1, 2, 9
LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
IS_ATTR, HAS_TAG = 1 << 9, 1 << 10
LATIN1_MASK, UTF8_MASK = 1 << 2, 1 << 3  # CHARSXP encoding bits, within the levels (flags >> 12)


@dataclass
class RVector:
    """An R vector: its elements (``None`` for ``NA_character_``) and its attributes (e.g. ``names``)."""

    values: list
    attributes: dict[str, object] = field(default_factory=dict)

    def named(self) -> dict[str, object]:
        """The elements keyed by the ``names`` attribute."""
        names = self.attributes.get("names")
        if not isinstance(names, RVector) or len(names.values) != len(self.values):
            raise RDataError("R vector has no names attribute matching its length")
        return dict(zip(names.values, self.values, strict=True))


class _Unserializer:
    def __init__(self, data: bytes, what: str):
        self.data, self.what, self.pos = data, what, 0
        self.references: list[object] = []

    def _int(self) -> int:
        if self.pos + 4 > len(self.data):
            raise RDataError(f"{self.what}: truncated R data at byte {self.pos}")
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def _length(self) -> int:
        length = self._int()
        if length == -1:  # long vector: two more ints hold the length
            upper, lower = self._int(), self._int()
            length = (upper << 32) + (lower & 0xFFFFFFFF)
        return length

    def _bytes(self, count: int) -> bytes:
        chunk = self.data[self.pos : self.pos + count]
        if len(chunk) != count:
            raise RDataError(f"{self.what}: truncated R data at byte {self.pos}")
        self.pos += count
        return chunk

    def read_header(self) -> None:
        if self.data[:2] != b"X\n":
            raise RDataError(f"{self.what}: not XDR-serialized R data (starts with {self.data[:2]!r})")
        self.pos = 2
        version = self._int()
        self._int(), self._int()  # writer's R version, minimal reader version
        if version == 3:
            self._bytes(self._int())  # native encoding name
        elif version != 2:
            raise RDataError(f"{self.what}: R serialization version {version} is not supported")

    def read_item(self) -> object:
        flags = self._int()
        sexp_type = flags & 0xFF
        if sexp_type == NILVALUE_SXP:
            return None
        if sexp_type == REFSXP:
            index = flags >> 8 or self._int()
            return self.references[index - 1]
        if sexp_type == SYMSXP:
            name = self.read_item()  # a CHARSXP
            self.references.append(name)
            return name
        if sexp_type == LISTSXP:
            return self._read_pairlist(flags)
        if sexp_type == CHARSXP:
            return self._read_string(flags)
        if sexp_type in (LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP):
            vector = RVector(self._read_vector_values(sexp_type))
            if flags & IS_ATTR:
                vector.attributes = self._attributes(self.read_item())
            return vector
        raise RDataError(f"{self.what}: R object type {sexp_type} at byte {self.pos - 4} is not supported")

    def _read_pairlist(self, flags: int) -> list[tuple[object, object]]:
        # A pairlist is a chain of (attributes?, tag?, car, cdr) cells; read it iteratively.
        cells: list[tuple[object, object]] = []
        while True:
            if flags & IS_ATTR:
                self.read_item()
            tag = self.read_item() if flags & HAS_TAG else None
            cells.append((tag, self.read_item()))
            flags = self._int()
            if flags & 0xFF == NILVALUE_SXP:
                return cells
            if flags & 0xFF != LISTSXP:
                raise RDataError(f"{self.what}: malformed pairlist at byte {self.pos - 4}")

    def _read_string(self, flags: int) -> str | None:
        length = self._int()
        if length == -1:
            return None  # NA_character_
        raw = self._bytes(length)
        encoding = "latin-1" if (flags >> 12) & LATIN1_MASK else "utf-8"
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError as error:
            raise RDataError(f"{self.what}: string at byte {self.pos - length} is not {encoding}") from error

    def _read_vector_values(self, sexp_type: int) -> list:
        length = self._length()
        if sexp_type in (LGLSXP, INTSXP):
            return list(struct.unpack(f">{length}i", self._bytes(4 * length)))
        if sexp_type == REALSXP:
            return list(struct.unpack(f">{length}d", self._bytes(8 * length)))
        return [self.read_item() for _ in range(length)]

    @staticmethod
    def _attributes(cells: object) -> dict[str, object]:
        if not isinstance(cells, list):
            return {}
        return {str(tag): value for tag, value in cells}


def unserialize(data: bytes, what: str = "R data") -> object:
    """Read one XDR-serialized R object (``what`` names it in error messages)."""
    reader = _Unserializer(data, what)
    reader.read_header()
    return reader.read_item()


def _decompress_record(record: bytes, compression: int, what: str) -> bytes:
    # Every record starts with the inflated length (4 bytes, big-endian). compression 1 is zlib;
    # 2 and 3 put a one-byte method code before the payload.
    (inflated_length,) = struct.unpack_from(">I", record, 0)
    if compression == 1:
        payload = zlib.decompress(record[4:])
    elif compression in (2, 3):
        method, body = record[4:5], record[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        if method not in decoders:
            raise RDataError(f"{what}: unknown record compression {method!r}")
        payload = decoders[method](body)
    else:
        raise RDataError(f"{what}: unknown lazy-load compression {compression}")
    if len(payload) != inflated_length:
        raise RDataError(f"{what}: record inflates to {len(payload)} bytes, header says {inflated_length}")
    return payload


def read_lazyload_database(rdx: bytes, rdb: bytes, what: str = "Rdata") -> dict[str, object]:
    """All objects of an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb`` contents), by name."""
    index = unserialize(gzip.decompress(rdx), f"{what}.rdx")
    if not isinstance(index, RVector):
        raise RDataError(f"{what}.rdx: expected a named list, got {type(index).__name__}")
    entries = index.named()
    compressed = entries.get("compressed")
    compression = int(compressed.values[0]) if isinstance(compressed, RVector) else 1
    objects: dict[str, object] = {}
    for name, location in entries["variables"].named().items():
        offset, length = location.values
        record = _decompress_record(rdb[offset : offset + length], compression, f"{what}.rdb[{name}]")
        objects[name] = unserialize(record, f"{what}.rdb[{name}]")
    return objects
