"""The compression codecs a stored numeric array may use (format version 2, spec/FORMAT.md
section 8.1): ``zstd`` and ``blosc``, the standard Zarr v3 bytes-to-bytes codecs, placed
between ``bytes`` and ``crc32c`` so that the CRC32C trailer and the manifest cover the
stored (compressed) bytes.  The user's option (:class:`Compression`, a codec name, or a
per-leaf policy) and the rule that writes an array uncompressed when its first chunk does
not shrink are here too.

numcodecs encodes and decodes (the codecs zarr-python itself uses).  What this module adds
is the JSON form, checked against what the format allows, and the bound a reader needs on
hostile input: a chunk must decode to exactly its chunk's size, a size read from the
frame's header before anything is decompressed, and it is decompressed into a buffer of
that size and no other (a small file never makes a reader allocate more than the array)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import numcodecs

from computable_flows_shim.errors import CheckpointCorruptError, CheckpointFormatError

CODECS = ("zstd", "blosc")
"""The bytes-to-bytes codecs of format version 2, by their Zarr v3 names."""
BLOSC_WRITE_CNAMES = ("zstd", "lz4")
"""blosc's inner compressors the writer offers."""
BLOSC_READ_CNAMES = ("blosclz", "lz4", "lz4hc", "zlib", "zstd")
"""blosc's inner compressors a reader accepts (every one numcodecs' blosc carries)."""
BLOSC_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")
DEFAULT_LEVEL = {"zstd": 3, "blosc": 5}
MAX_LEVEL = {"zstd": 22, "blosc": 9}
DEFAULT_MIN_SAVING = 0.1
"""An array is written uncompressed unless its first chunk shrinks by at least this fraction."""

_ZSTD_MAGIC = 0xFD2FB528
_BLOSC_HEADER = 16


def max_stored_bytes(chunk_bytes: int) -> int:
    """The largest encoded chunk (before its CRC) a reader accepts for ``chunk_bytes`` of data:
    above both codecs' worst case (zstd's ``ZSTD_compressBound``, blosc's 16-byte overhead),
    so that a hostile file's size is bounded before it is read."""
    return chunk_bytes + chunk_bytes // 128 + 1024


def _zstd_content_size(body: memoryview) -> int | None:
    """The decompressed size a zstd frame's header states (RFC 8878, 3.1.1.1), or None when
    the header does not state it or is not a zstd frame header."""
    if len(body) < 6 or int.from_bytes(body[:4], "little") != _ZSTD_MAGIC:
        return None
    fhd = body[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    n = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if n == 0 or len(body) < pos + n:
        return None
    return int.from_bytes(body[pos : pos + n], "little") + (256 if n == 2 else 0)


@dataclass(frozen=True)
class ChunkCodec:
    """One stored array's bytes-to-bytes codec, as its ``zarr.json`` spells it
    (:meth:`metadata`), with what encodes and decodes its chunks."""

    name: str
    level: int
    checksum: bool = False  # zstd
    cname: str = ""  # blosc
    shuffle: str = ""  # blosc
    typesize: int = 0  # blosc
    blocksize: int = 0  # blosc

    def metadata(self) -> dict:
        """The codec's entry in the array's ``codecs`` list, as zarr-python writes it."""
        if self.name == "zstd":
            return {"name": "zstd", "configuration": {"level": self.level, "checksum": self.checksum}}
        return {
            "name": "blosc",
            "configuration": {
                "typesize": self.typesize,
                "cname": self.cname,
                "clevel": self.level,
                "shuffle": self.shuffle,
                "blocksize": self.blocksize,
            },
        }

    @cached_property
    def _numcodec(self) -> Any:
        if self.name == "zstd":
            return numcodecs.Zstd(level=self.level, checksum=self.checksum)
        return numcodecs.Blosc(
            cname=self.cname,
            clevel=self.level,
            shuffle=BLOSC_SHUFFLES.index(self.shuffle),
            blocksize=self.blocksize,
            typesize=self.typesize,
        )

    def encode(self, data: Any) -> bytes:
        """The stored bytes of one chunk's raw bytes ``data`` (a contiguous buffer)."""
        return bytes(self._numcodec.encode(data))

    def check(self, body: Any, n: int, where: str) -> None:
        """Refuse stored bytes whose header does not say they decode to exactly ``n`` bytes
        (call it before allocating the buffer to decode into: a decompression bomb is refused
        before anything is allocated or decompressed)."""
        body = memoryview(body).cast("B")
        if self.name == "zstd":
            size = _zstd_content_size(body)
            if size is None:
                raise CheckpointCorruptError(f"{where}: not a zstd frame that states its size")
        else:
            if len(body) < _BLOSC_HEADER:
                raise CheckpointCorruptError(f"{where}: blosc chunk shorter than its header")
            size = int.from_bytes(body[4:8], "little")
            stored = int.from_bytes(body[12:16], "little")
            if stored != len(body):
                raise CheckpointCorruptError(f"{where}: blosc header says {stored} stored bytes, found {len(body)}")
        if size != n:
            raise CheckpointCorruptError(f"{where}: compressed chunk decodes to {size} bytes, expected {n}")

    def decode_into(self, body: Any, dest: memoryview, where: str) -> None:
        """Decode the stored bytes ``body`` into ``dest``, which holds exactly the chunk's raw
        size (:meth:`check` first)."""
        body = memoryview(body).cast("B")
        self.check(body, len(dest), where)
        try:
            self._numcodec.decode(body, out=dest)
        except (RuntimeError, ValueError, TypeError) as e:
            raise CheckpointCorruptError(f"{where}: undecodable {self.name} chunk ({e})") from None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_codec(entry: Any, where: str) -> ChunkCodec:
    """A ``zstd`` or ``blosc`` entry of an array's ``codecs`` list, checked; anything else
    (another codec, a missing or ill-typed setting) is refused."""
    name = entry.get("name") if isinstance(entry, dict) else None
    conf = entry.get("configuration") if isinstance(entry, dict) else None
    if name not in CODECS or not isinstance(conf, dict):
        raise CheckpointFormatError(f"{where}: unsupported codec {entry!r}")
    if name == "zstd":
        level: Any = conf.get("level")
        checksum: Any = conf.get("checksum", False)
        if set(conf) - {"level", "checksum"} or not _is_int(level) or not -(1 << 17) <= level <= 22:
            raise CheckpointFormatError(f"{where}: unsupported zstd configuration {conf!r}")
        if not isinstance(checksum, bool):
            raise CheckpointFormatError(f"{where}: unsupported zstd configuration {conf!r}")
        return ChunkCodec("zstd", level, checksum=checksum)
    cname: Any = conf.get("cname")
    clevel: Any = conf.get("clevel")
    shuffle: Any = conf.get("shuffle")
    typesize: Any = conf.get("typesize")
    blocksize: Any = conf.get("blocksize", 0)
    if (
        set(conf) - {"cname", "clevel", "shuffle", "typesize", "blocksize"}
        or cname not in BLOSC_READ_CNAMES
        or not (_is_int(clevel) and 0 <= clevel <= 9)
        or shuffle not in BLOSC_SHUFFLES
        or not (_is_int(typesize) and 1 <= typesize <= 255)
        or not (_is_int(blocksize) and 0 <= blocksize < 1 << 31)
    ):
        raise CheckpointFormatError(f"{where}: unsupported blosc configuration {conf!r}")
    return ChunkCodec("blosc", clevel, cname=cname, shuffle=shuffle, typesize=typesize, blocksize=blocksize)


@dataclass(frozen=True)
class Compression:
    """How the state arrays of a checkpoint are compressed (README, "Compression").

    ``codec``: ``"zstd"`` or ``"blosc"`` (standard Zarr v3 codecs: zarr-python and tensorstore
    decode them).  ``level``: zstd 1-22 (default 3), blosc 1-9 (default 5).  ``cname``: blosc's
    inner compressor, ``"zstd"`` (default) or ``"lz4"``; ``shuffle``: blosc's byte shuffle
    (default on: the bytes of each element grouped by significance, which helps floats).
    ``min_saving``: an array whose first chunk does not shrink by at least this fraction is
    written uncompressed (default 0.1: stored >= 90 % of raw switches it off; 0 never does).

    Example::

        >>> mgr = CheckpointManager(path, compression=Compression("zstd", level=5))
        >>> mgr = CheckpointManager(path, compression="blosc")   # Compression("blosc")
    """

    codec: str = "zstd"
    level: int | None = None
    cname: str = "zstd"
    shuffle: bool = True
    min_saving: float = DEFAULT_MIN_SAVING

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"Compression: codec must be one of {CODECS}, got {self.codec!r}")
        level = DEFAULT_LEVEL[self.codec] if self.level is None else self.level
        if not _is_int(level) or not 1 <= level <= MAX_LEVEL[self.codec]:
            raise ValueError(
                f"Compression: {self.codec} level must be an int from 1 to {MAX_LEVEL[self.codec]}, got {self.level!r}"
            )
        object.__setattr__(self, "level", level)
        if self.cname not in BLOSC_WRITE_CNAMES:
            raise ValueError(
                f"Compression: cname (blosc's compressor) must be one of {BLOSC_WRITE_CNAMES}, got {self.cname!r}"
            )
        if not isinstance(self.shuffle, bool):
            raise ValueError(f"Compression: shuffle must be True or False, got {self.shuffle!r}")
        m = self.min_saving
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not (0 <= m < 1) or math.isnan(m):
            raise ValueError(f"Compression: min_saving must be a fraction in [0, 1), got {m!r}")

    def chunk_codec(self, itemsize: int) -> ChunkCodec:
        """The codec of an array whose elements have ``itemsize`` bytes."""
        assert self.level is not None
        if self.codec == "zstd":
            return ChunkCodec("zstd", self.level)
        shuffle = "shuffle" if self.shuffle else "noshuffle"
        return ChunkCodec("blosc", self.level, cname=self.cname, shuffle=shuffle, typesize=max(1, min(255, itemsize)))

    def keeps(self, stored: int, raw: int) -> bool:
        """Whether an array whose first chunk of ``raw`` bytes compresses to ``stored`` bytes
        stays compressed (the switch-off rule)."""
        return self.min_saving == 0 or stored < raw * (1 - self.min_saving)


CompressionOption = Any
"""``None`` (or ``False``: uncompressed), ``"zstd"``, ``"blosc"``, a :class:`Compression`, a dict
of its fields, or a callable ``(path, array) -> one of those`` (a per-leaf policy)."""

_ACCEPTED = (
    "None, 'zstd', 'blosc', a Compression, a dict of Compression's fields "
    "(codec, level, cname, shuffle, min_saving), or a callable (path, array) returning one of those"
)


def as_compression(value: Any, what: str = "compression") -> Compression | None:
    """``value`` (one leaf's setting) as a :class:`Compression`, or None: uncompressed."""
    if value is None or value is False:
        return None
    if isinstance(value, Compression):
        return value
    if isinstance(value, str):
        if value not in CODECS:
            raise ValueError(f"{what}: unknown codec {value!r}; expected {_ACCEPTED}")
        return Compression(value)
    if isinstance(value, Mapping):
        known = {f.name for f in fields(Compression) if f.init}
        unknown = sorted(map(str, set(value) - known))
        if unknown:
            raise ValueError(f"{what}: unknown setting(s) {unknown}; Compression takes {sorted(known)}")
        try:
            return Compression(**value)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
    raise ValueError(f"{what}: expected {_ACCEPTED}; got {value!r}")


LeafPolicy = Callable[[str, Any], "Compression | None"]


def compression_policy(option: CompressionOption, what: str = "compression") -> LeafPolicy:
    """The per-leaf policy of a ``compression=`` option, checked now (a bad value fails before
    anything is written): ``policy(path, array)`` gives the leaf's :class:`Compression` or None."""
    if callable(option) and not isinstance(option, (str, Compression)):

        def policy(path: str, array: Any) -> Compression | None:
            return as_compression(option(path, array), f"{what} policy, for the leaf at {path!r}")

        return policy
    fixed = as_compression(option, what)
    return lambda path, array: fixed


__all__ = [
    "CODECS",
    "ChunkCodec",
    "Compression",
    "CompressionOption",
    "LeafPolicy",
    "as_compression",
    "compression_policy",
    "max_stored_bytes",
    "parse_codec",
]
