"""One Zarr v3 array in a local directory: metadata, chunk layout, chunk bytes.

Every array this package writes uses the codecs ``bytes`` (little endian) then
``crc32c``, or ``vlen-utf8`` then ``crc32c`` for text columns, and every chunk file
is written, even an all-zero one, so a missing file is damage.  Chunks of numeric
arrays are C-contiguous slabs of the array (shape ``(1, ..., 1, k, n_{i+1}, ...,
n_last)``), so a chunk is one ``writev`` from the array's own memory and one
``readinto`` into the restored array: no copy in between.  A compressed array
(format version 2, ``_format/codecs.py``) has a ``zstd`` or ``blosc`` codec between
the two, the CRC32C covering the compressed bytes; its chunks are encoded from, and
decoded into, the same memory.  See spec/FORMAT.md, "Arrays".

Why one module: one stored array end to end, its ``zarr.json``, its chunk encoding with the
CRC32C trailer, and the chunk-file I/O with every check a reader needs (regular file, size,
CRC, manifest); the writer and the reader of the same bytes stay side by side.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import crc32c as _crc
import numcodecs
import numpy as np

from computable_flows_shim import _platform
from computable_flows_shim._format import spec as S
from computable_flows_shim._format.codecs import CODECS, ChunkCodec, max_stored_bytes, parse_codec
from computable_flows_shim._format.dtypes import fill_value_json, from_zarr_name, zarr_name
from computable_flows_shim.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError

TARGET_CHUNK_BYTES = 4 << 20
"""Numeric chunks hold at most this many bytes (a long last axis is split too)."""
MAX_METADATA_BYTES = 16 << 20
"""A zarr.json larger than this is refused (bounded memory on hostile input)."""
STRING = "string"
_VLEN = numcodecs.VLenUTF8()


ALIGNMENT = 64
"""Restored arrays start on this byte boundary: JAX on the CPU then adopts the host buffer
as it is (``jax.device_put`` without a copy), and a device transfer reads aligned memory."""


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an :data:`ALIGNMENT` boundary
    (numpy's own allocations of large arrays are only 16-byte aligned)."""
    n = math.prod(shape) * dtype.itemsize
    buf = np.empty(n + ALIGNMENT, np.uint8)
    off = -buf.ctypes.data % ALIGNMENT
    return buf[off : off + n].view(dtype).reshape(shape)


def slab_chunk_shape(shape: tuple[int, ...], itemsize: int, target: int = TARGET_CHUNK_BYTES) -> tuple[int, ...]:
    """The largest C-contiguous slab chunk of at most ``target`` bytes."""
    chunk = [1] * len(shape)
    rest = max(itemsize, 1)
    for i in range(len(shape) - 1, -1, -1):
        n = max(shape[i], 1)
        if rest * n <= target:
            chunk[i] = n
            rest *= n
        else:
            chunk[i] = max(1, target // rest)
            break
    return tuple(chunk)


def _is_slab(shape: tuple[int, ...], chunk: tuple[int, ...]) -> bool:
    """True when every chunk is one contiguous run of the C-order array."""
    i = 0
    while i < len(shape) and chunk[i] == 1:
        i += 1
    return all(chunk[j] == shape[j] for j in range(i + 1, len(shape)))


_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN})
"""Errors that say nothing about the checkpoint (this process is out of something): raised as they are."""


class Mirror(Protocol):
    """The seam through which a remote store feeds the readers (the object-store backend,
    ``store/_s3.py``): a local directory ``root`` standing for a remote checkpoint, whose
    directory tree exists and whose files are fetched on demand.  The store hands it out
    (``Store.mirror``) and the caller passes it to every read (``mirror=``); ``rel`` is a
    path relative to ``root``, ``/``-separated."""

    root: str

    def fetch(self, rel: str) -> bool:
        """Fetch the file into the mirror (metadata: read several times); False if the
        checkpoint has no such object (then it is missing, as locally)."""
        ...

    def read(self, rel: str) -> Any:
        """The object's bytes (a buffer), checked against the commit record, without writing
        a file (chunks: read once); None if the checkpoint has no such object."""
        ...

    def size(self, rel: str) -> int | None:
        """The object's size from the commit record, without fetching it."""
        ...

    def digest(self, rel: str) -> str | None:
        """The object's SHA-256 (hex) from the commit record, without fetching it (None: not
        recorded): equal digests are the same bytes (an unchanged chunk's server-side copy)."""
        ...

    def prefetch(self, prefix: str) -> None:
        """Fetch every array's metadata file under ``prefix`` (a group, ``/``-terminated) not
        fetched yet, many at once (a reader
        about to open all of them one by one would otherwise wait one round trip each);
        failures are left to the reads that follow, which raise them with their context."""
        ...


def mirror_rel(mirror: Mirror | None, path: str) -> str | None:
    """``path`` relative to the mirror's root (``/``-separated), or None outside any mirror."""
    if mirror is None:
        return None
    root = os.path.join(mirror.root, "")
    return path[len(root) :].replace(os.sep, "/") if path.startswith(root) else None


def open_regular(path: str, where: str, what: str, mirror: Mirror | None = None) -> tuple[int, os.stat_result]:
    """Open a checkpoint file for reading: never through a symlink, never anything but a
    regular file (a FIFO would block, a device or directory would not read as a file), and
    the reasons it cannot be opened as our errors (a hostile or damaged checkpoint must
    raise nothing else).  A file of a remote checkpoint's ``mirror`` is fetched on
    first open."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_BINARY", 0)  # Windows: never text mode (CRLF translation, Ctrl-Z as end of file)
    try:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            rel = mirror_rel(mirror, path)
            if mirror is None or rel is None or not mirror.fetch(rel):
                raise
            fd = os.open(path, flags)
    except CheckpointError:
        raise  # from a mirror's fetch: deleted while read, unreachable store, object not as recorded
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise CheckpointCorruptError(f"{where}: {what} missing") from None
        if e.errno == errno.ELOOP:
            raise CheckpointFormatError(f"{where}: {what} is a symlink") from None
        if e.errno in _RESOURCE_ERRNOS:
            raise
        raise CheckpointCorruptError(f"{where}: cannot open {what} ({e})") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointCorruptError(f"{where}: {what} is not a regular file")
    return fd, st


def read_failed(e: OSError, where: str, what: str) -> BaseException:
    """An error while reading an opened checkpoint file (EIO: unreadable medium)."""
    if e.errno in _RESOURCE_ERRNOS:
        return e
    return CheckpointCorruptError(f"{where}: cannot read {what} ({e})")


def loads_metadata(raw: bytes, where: str) -> dict:
    """Parse the bytes of a zarr.json (bounded size and depth); damage becomes our errors."""
    if len(raw) > MAX_METADATA_BYTES:
        raise CheckpointFormatError(f"{where}: metadata larger than {MAX_METADATA_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, int > 4300 digits
        raise CheckpointCorruptError(f"{where}: unreadable metadata ({e.__class__.__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise CheckpointCorruptError(f"{where}: metadata is not a JSON object")
    return doc


def read_json_raw(path: str, where: str, mirror: Mirror | None = None) -> tuple[dict, bytes, os.stat_result]:
    """A zarr.json parsed, with its bytes and the stat of the file they came from."""
    name = os.path.basename(path)
    fd, st = open_regular(path, where, name, mirror)
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_METADATA_BYTES + 1)
    except OSError as e:
        raise read_failed(e, where, name) from e
    return loads_metadata(raw, where), raw, st


def read_json(path: str, where: str, expected_crc: int | None = None, mirror: Mirror | None = None) -> dict:
    """Parse a zarr.json with bounded size and depth; damage becomes our errors.

    ``expected_crc``: the file's CRC32C from the checkpoint's metadata checksums
    (spec/FORMAT.md, "Metadata checksums"), checked before the JSON is trusted."""
    doc, raw, _ = read_json_raw(path, where, mirror)
    if expected_crc is not None and _crc.crc32c(raw) != expected_crc:
        raise CheckpointCorruptError(
            f"{where}: {os.path.basename(path)} does not match its checksum in the root metadata "
            f"(CRC32C {_crc.crc32c(raw):#010x}, expected {expected_crc:#010x})"
        )
    return doc


@dataclass
class Layout:
    """Shape, dtype and chunk grid of one array, with its chunk keys and its compression codec."""

    shape: tuple[int, ...]
    dtype: np.dtype | None  # None for text
    chunk_shape: tuple[int, ...]
    separator: str = S.CHUNK_SEPARATOR
    codec: ChunkCodec | None = None  # numeric chunks only: between bytes and crc32c (format v2)
    grid: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.grid = tuple(math.ceil(n / c) for n, c in zip(self.shape, self.chunk_shape))

    @property
    def nchunks(self) -> int:
        return math.prod(self.grid)

    def coords(self) -> Iterator[tuple[int, ...]]:
        return iter(np.ndindex(*self.grid)) if self.grid else iter([()])

    def key(self, coords: tuple[int, ...]) -> str:
        return self.separator.join(["c", *map(str, coords)])

    @property
    def is_slab(self) -> bool:
        """Every chunk is one contiguous run of the C-order array (chunks in grid order are
        the array's bytes in order)."""
        return _is_slab(self.shape, self.chunk_shape)

    def region(self, coords: tuple[int, ...]) -> tuple[slice, ...]:
        return tuple(slice(j * c, min((j + 1) * c, n)) for j, c, n in zip(coords, self.chunk_shape, self.shape))


def array_metadata(layout: Layout, dimension_names: list[str], attributes: dict) -> dict:
    fill: object
    if layout.dtype is None:
        data_type, fill, codecs = STRING, "", [{"name": "vlen-utf8"}]
    else:
        name = zarr_name(layout.dtype)
        assert name is not None
        data_type, fill = name, fill_value_json(name)
        bytes_codec: dict = {"name": "bytes"}
        if layout.dtype.itemsize > 1:
            bytes_codec["configuration"] = {"endian": "little"}
        codecs = [bytes_codec] if layout.codec is None else [bytes_codec, layout.codec.metadata()]
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(layout.shape),
        "data_type": data_type,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(layout.chunk_shape)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": layout.separator}},
        "fill_value": fill,
        "codecs": [*codecs, {"name": "crc32c"}],
        "attributes": attributes,
        "dimension_names": dimension_names,
    }


def group_metadata(attributes: dict, consolidated: dict | None = None) -> dict:
    doc: dict = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    if consolidated is not None:
        # zarr-python's inline consolidated metadata: lets xarray.open_zarr open the
        # group without a warning and without listing the directory.
        doc["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": consolidated}
    return doc


def _slab_span(layout: Layout, region: tuple[slice, ...], itemsize: int) -> tuple[int, int]:
    """Byte offset and length of a slab chunk's valid part in the C-order array."""
    n = math.prod(s.stop - s.start for s in region) * itemsize
    if not layout.shape or n == 0:
        return 0, n
    return int(np.ravel_multi_index(tuple(s.start for s in region), layout.shape)) * itemsize, n


def chunk_buffers(array: np.ndarray, layout: Layout, coords: tuple[int, ...]) -> list:
    """The encoded bytes of one chunk, before the CRC, as a list of buffers."""
    bufs = raw_chunk_buffers(array, layout, coords)
    if layout.codec is None:
        return bufs
    raw = bufs[0] if len(bufs) == 1 else b"".join(bufs)  # an edge chunk: its data and the padding
    return [layout.codec.encode(raw)]


def raw_chunk_buffers(array: np.ndarray, layout: Layout, coords: tuple[int, ...]) -> list:
    """The bytes of one chunk before any compression (the ``bytes`` or ``vlen-utf8`` codec's
    output), as a list of buffers."""
    region = layout.region(coords)
    if layout.dtype is None:  # text: edge chunks padded with "" to the full chunk shape, as Zarr requires
        full_text = np.full(layout.chunk_shape, "", dtype=object)
        full_text[tuple(slice(0, s.stop - s.start) for s in region)] = array[region]
        return [_VLEN.encode(full_text.reshape(-1))]
    chunk_bytes = math.prod(layout.chunk_shape) * array.itemsize
    if _is_slab(layout.shape, layout.chunk_shape) and array.flags.c_contiguous:
        flat = array.reshape(-1).view(np.uint8)
        start, n = _slab_span(layout, region, array.itemsize)
        bufs: list[Any] = [flat[start : start + n].data]
        if n < chunk_bytes:  # edge chunk: Zarr stores it at full chunk shape
            bufs.append(bytes(chunk_bytes - n))
        return bufs
    full = np.zeros(layout.chunk_shape, dtype=array.dtype)
    full[tuple(slice(0, s.stop - s.start) for s in region)] = array[region]
    return [full.reshape(-1).view(np.uint8).data]


def write_file(path: str, bufs: list, durable: bool) -> None:
    """Create ``path`` (never replacing), write all of ``bufs``, fsync if durable."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o644)
    try:
        views = [memoryview(b).cast("B") for b in bufs if len(memoryview(b).cast("B"))]
        while views:
            n = _platform.writev(fd, views)  # os.writev; one os.write where there is none (Windows)
            if n == 0:
                raise OSError(errno.EIO, "short write", path)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        if durable:
            # fdatasync: the data and the size, without the timestamps nobody needs
            _platform.sync_data(fd)  # os.fdatasync on Linux; F_FULLFSYNC on macOS
    finally:
        os.close(fd)


_SCRATCH = threading.local()


def _scratch(n: int) -> memoryview:
    """A per-thread reusable buffer: fresh memory costs a page fault per 4 KiB on first touch."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or len(buf) < n:
        buf = _SCRATCH.buf = bytearray(max(n, TARGET_CHUNK_BYTES + S.CRC_BYTES))
    return memoryview(buf)[:n]


def _same_bytes(f: Any, bufs: list) -> bool:
    """True when the open file ``f`` holds exactly the concatenation of ``bufs``."""
    views = [memoryview(b).cast("B") for b in bufs]
    if os.fstat(f.fileno()).st_size != sum(len(v) for v in views):
        return False
    for v in views:
        got = _scratch(len(v))
        if f.readinto(got) != len(v):
            return False
        # compared as numpy arrays: memoryview == memoryview goes element by element (30x slower)
        if not np.array_equal(np.frombuffer(got, np.uint8), np.frombuffer(v, np.uint8)):
            return False
    return True


def _link_if_same(base: str, bufs: list, path: str, durable: bool) -> bool:
    """Hard-link ``base`` as ``path`` when it holds exactly ``bufs``; False when it differs or
    cannot be linked (deleted meanwhile, too many links, another file system).  A durable save
    syncs the file it links first, through the descriptor it compared: the base may have been
    saved with ``durable=False``, and a link to data still in the page cache would not survive a
    power cut (a clean file's fdatasync costs about 50 us here).  A failed sync raises, like any
    failed fsync (never retried)."""
    try:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(base, flags)
    except OSError:
        return False
    with os.fdopen(fd, "rb", buffering=0) as f:
        try:
            if not _same_bytes(f, bufs):
                return False
        except OSError:
            return False
        if durable:
            _platform.sync_data(f.fileno())
    try:
        os.link(base, path, follow_symlinks=False)
    except OSError:
        return False
    return True


def write_chunk(
    array: np.ndarray,
    layout: Layout,
    coords: tuple[int, ...],
    dirpath: str,
    durable: bool,
    base: tuple[str, int] | None = None,
    sink: Sink | None = None,
) -> tuple[int, int]:
    """Write one chunk file; returns ``(crc32c, bytes written)``.

    ``base`` is ``(path, crc)`` of the same chunk in an earlier checkpoint of the run
    with the same layout.  When its CRC matches and its bytes are identical, the
    chunk is hard-linked instead of written (an incremental save): the file is
    immutable, and a link keeps this checkpoint whole when the other is deleted."""
    path = os.path.join(dirpath, layout.key(coords))
    return store_chunk(chunk_buffers(array, layout, coords), path, durable, base, sink)


Sink = Callable[[str, list], int]
"""Where a store whose commit uploads the staging directory sends chunk files instead of
writing them there: ``sink(path, bufs)`` takes the file's path under the staging directory
and its bytes (buffers to concatenate, which it must not keep past the save) and returns
the file's size (what the save counts as written; the store counts its own PUTs and copies)."""


def store_chunk(
    bufs: list, path: str, durable: bool, base: tuple[str, int] | None = None, sink: Sink | None = None
) -> tuple[int, int]:
    """Append the CRC32C to a chunk's encoded ``bufs`` and write (or hard-link, see
    :func:`write_chunk`) the chunk file ``path``, or hand it to ``sink``; returns
    ``(crc32c, bytes written)``."""
    crc = 0
    for b in bufs:
        crc = _crc.crc32c(b, crc)
    bufs = [*bufs, crc.to_bytes(S.CRC_BYTES, "little")]
    if sink is not None:
        return crc, sink(path, bufs)
    if base is not None and base[1] == crc and _link_if_same(base[0], bufs, path, durable):
        return crc, 0
    write_file(path, bufs, durable)
    return crc, sum(len(memoryview(b).cast("B")) for b in bufs)


# ---------------------------------------------------------------- reading


def parse_array(meta: dict, where: str) -> tuple[Layout, list[int], dict]:
    """Validate an array zarr.json against what format v1 writes; refuse the rest."""
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        raise CheckpointFormatError(f"{where}: not a Zarr v3 array")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise CheckpointFormatError(f"{where}: bad shape {shape!r}")
    if len(shape) > 64 or math.prod(shape) > 1 << 50 or any(n > 1 << 50 for n in shape):
        raise CheckpointFormatError(f"{where}: shape {shape} too large")
    data_type = meta.get("data_type")
    dtype = None if data_type == STRING else from_zarr_name(data_type, where)
    grid = meta.get("chunk_grid")
    try:
        assert isinstance(grid, dict) and grid.get("name") == "regular"
        chunk = grid["configuration"]["chunk_shape"]
        assert isinstance(chunk, list) and len(chunk) == len(shape)
        assert all(isinstance(c, int) and not isinstance(c, bool) and 0 < c <= 1 << 40 for c in chunk)
    except (AssertionError, KeyError, TypeError):
        raise CheckpointFormatError(f"{where}: unsupported chunk_grid {grid!r}") from None
    itemsize = 1 if dtype is None else dtype.itemsize
    if dtype is not None and math.prod(chunk) * itemsize > 1 << 32:
        raise CheckpointFormatError(f"{where}: chunk_shape {chunk} too large")
    cke = meta.get("chunk_key_encoding")
    cke_conf = cke.get("configuration", {}) if isinstance(cke, dict) else None
    sep = cke_conf.get("separator", "/") if isinstance(cke_conf, dict) else None
    if not isinstance(cke, dict) or cke.get("name") != "default" or sep not in (".", "/"):
        raise CheckpointFormatError(f"{where}: unsupported chunk_key_encoding {cke!r}")
    codecs = meta.get("codecs")
    names = (
        [c.get("name") for c in codecs]
        if isinstance(codecs, list) and all(isinstance(c, dict) for c in codecs)
        else None
    )
    expected = ["vlen-utf8", "crc32c"] if dtype is None else ["bytes", "crc32c"]
    codec = None
    if dtype is not None and names is not None and len(names) == 3 and names[::2] == expected and names[1] in CODECS:
        codec = parse_codec(codecs[1], where)  # type: ignore[index]  # format v2: compressed
    elif names != expected:
        raise CheckpointFormatError(
            f"{where}: unsupported codecs {codecs!r} (format v2 reads {expected}, or for a numeric array "
            "a zstd or blosc codec between them)"
        )
    if dtype is not None:
        conf = codecs[0].get("configuration") or {}  # type: ignore[index]
        endian = conf.get("endian", "little") if isinstance(conf, dict) else None
        if endian != "little" and dtype.itemsize > 1:
            raise CheckpointFormatError(f"{where}: unsupported endian {endian!r}")
    attrs = meta.get("attributes", {})
    if not isinstance(attrs, dict):
        raise CheckpointFormatError(f"{where}: attributes is not an object")
    layout = Layout(tuple(shape), dtype, tuple(chunk), sep, codec)
    crcs = attrs.get(S.AA_CRC32C)
    if (
        not isinstance(crcs, list)
        or len(crcs) != layout.nchunks
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 1 << 32 for c in crcs)
    ):
        raise CheckpointFormatError(f"{where}: {S.AA_CRC32C} must list one CRC32C per chunk ({layout.nchunks})")
    return layout, crcs, attrs


def _chunk_path(dirpath: str, layout: Layout, coords: tuple[int, ...], where: str = "") -> str:
    key = layout.key(coords)
    path = os.path.join(dirpath, *key.split("/"))
    if "/" in key:  # separator "/": the directories on the way must not be symlinks (section 13)
        parent = os.path.dirname(path)
        if os.path.realpath(parent) != os.path.join(os.path.realpath(dirpath), *key.split("/")[:-1]):
            raise CheckpointFormatError(f"{where}: a directory on the way to the chunk file is a symlink")
    return path


def _check_crc(data_crc: int, trailer: bytes, expected: int, where: str) -> None:
    stored = int.from_bytes(trailer, "little")
    if data_crc != stored:
        raise CheckpointCorruptError(f"{where}: checksum mismatch (data {data_crc:#010x}, stored {stored:#010x})")
    if stored != expected:
        raise CheckpointCorruptError(
            f"{where}: chunk does not match the manifest (CRC32C {stored:#010x}, expected {expected:#010x}); "
            "it was swapped or replaced"
        )


def _open_nofollow(path: str, where: str, mirror: Mirror | None) -> tuple[Any, int]:
    """A chunk file opened for reading, with its size.  A chunk of a mirrored remote
    checkpoint is read from the store into memory (it is read once: no file is written)."""
    rel = mirror_rel(mirror, path)
    if mirror is not None and rel is not None and not os.path.lexists(path):
        data = mirror.read(rel)
        if data is not None:
            return io.BytesIO(data), len(data)
    fd, st = open_regular(path, where, "chunk file", mirror)
    return os.fdopen(fd, "rb", buffering=0), st.st_size


def _read_small(f, size: int, where: str) -> bytes:
    try:
        raw = f.read()
    except OSError as e:
        raise read_failed(e, where, "chunk file") from e
    if len(raw) != size:
        raise CheckpointCorruptError(f"{where}: chunk file changed while reading")
    return raw


def _check_chunk_size(size: int, chunk_bytes: int, cwhere: str, codec: ChunkCodec | None = None) -> None:
    if codec is not None:  # compressed: any size up to the codec's worst case (bounded before reading)
        if not S.CRC_BYTES < size <= max_stored_bytes(chunk_bytes) + S.CRC_BYTES:
            raise CheckpointCorruptError(
                f"{cwhere}: compressed chunk file has {size} bytes, expected {S.CRC_BYTES + 1} to "
                f"{max_stored_bytes(chunk_bytes) + S.CRC_BYTES}"
            )
        return
    if size != chunk_bytes + S.CRC_BYTES:
        raise CheckpointCorruptError(
            f"{cwhere}: chunk file has {size} bytes, expected {chunk_bytes + S.CRC_BYTES} (truncated or padded)"
        )


def read_chunk(
    layout: Layout,
    coords: tuple[int, ...],
    dirpath: str,
    expected_crc: int,
    where: str,
    mirror: Mirror | None = None,
) -> np.ndarray:
    """Read and check one chunk; returns its valid region (edge chunks trimmed)."""
    cwhere = f"{where}, chunk {layout.key(coords)!r}"
    region = layout.region(coords)
    valid = tuple(slice(0, s.stop - s.start) for s in region)
    f, size = _open_nofollow(_chunk_path(dirpath, layout, coords, cwhere), cwhere, mirror)
    with f:
        if layout.dtype is None:
            if size > 1 << 31 or size < S.CRC_BYTES:
                raise CheckpointCorruptError(f"{cwhere}: text chunk has a bad size ({size} bytes)")
            raw = _read_small(f, size, cwhere)
            body = raw[: -S.CRC_BYTES]
            _check_crc(_crc.crc32c(body), raw[-S.CRC_BYTES :], expected_crc, cwhere)
            n = math.prod(layout.chunk_shape)
            # the count must be the chunk's size, and fit the bytes (4 per string at least),
            # before the decoder allocates that many objects (bounded memory)
            if int.from_bytes(body[:4], "little") != n or len(body) < 4 + 4 * n:
                raise CheckpointCorruptError(f"{cwhere}: text chunk does not hold {n} strings")
            try:
                values = np.asarray(_VLEN.decode(body), dtype=object)
                return values.reshape(layout.chunk_shape)[valid]
            except (ValueError, RuntimeError, TypeError) as e:
                raise CheckpointCorruptError(f"{cwhere}: undecodable text chunk ({e})") from None
        chunk_bytes = math.prod(layout.chunk_shape) * layout.dtype.itemsize
        view = _read_stored(f, size, chunk_bytes, layout.codec, expected_crc, cwhere)
    if layout.codec is not None:
        data = np.empty(chunk_bytes, np.uint8)
        layout.codec.decode_into(view, data.data, cwhere)
        view = data.data
    return np.frombuffer(view, dtype=layout.dtype).reshape(layout.chunk_shape)[valid]


def _read_stored(
    f: Any, size: int, chunk_bytes: int, codec: ChunkCodec | None, expected_crc: int, cwhere: str
) -> memoryview:
    """The stored bytes of a numeric chunk file (without its CRC trailer), after every check
    made before decoding: size, CRC and manifest, and for a compressed chunk the size its
    header claims (the CRC covers the stored bytes, so nothing is decompressed unchecked)."""
    _check_chunk_size(size, chunk_bytes, cwhere, codec)
    raw = _read_small(f, size, cwhere)
    body = memoryview(raw)[: size - S.CRC_BYTES]
    _check_crc(_crc.crc32c(body), raw[size - S.CRC_BYTES :], expected_crc, cwhere)
    if codec is not None:
        codec.check(body, chunk_bytes, cwhere)
    return body


def read_chunk_into(
    out: np.ndarray,
    layout: Layout,
    coords: tuple[int, ...],
    dirpath: str,
    expected_crc: int,
    where: str,
    mirror: Mirror | None = None,
) -> None:
    """Read, check and place one chunk of ``out`` (a full-shape array).  Slab
    chunks are read straight into ``out``'s memory."""
    region = layout.region(coords)
    if layout.dtype is None or not (_is_slab(layout.shape, layout.chunk_shape) and out.flags.c_contiguous):
        out[region] = read_chunk(layout, coords, dirpath, expected_crc, where, mirror)
        return
    cwhere = f"{where}, chunk {layout.key(coords)!r}"
    itemsize = layout.dtype.itemsize
    chunk_bytes = math.prod(layout.chunk_shape) * itemsize
    if layout.codec is not None:
        _read_compressed_into(out, layout, coords, dirpath, expected_crc, cwhere, mirror)
        return
    f, size = _open_nofollow(_chunk_path(dirpath, layout, coords, cwhere), cwhere, mirror)
    with f:
        _check_chunk_size(size, chunk_bytes, cwhere)
        start, n = _slab_span(layout, region, itemsize)
        dst = out.reshape(-1).view(np.uint8)[start : start + n].data
        try:
            got = f.readinto(dst) if n else 0
            rest = f.read()
        except OSError as e:
            raise read_failed(e, cwhere, "chunk file") from e
    if got != n or len(rest) != chunk_bytes - n + S.CRC_BYTES:
        raise CheckpointCorruptError(f"{cwhere}: chunk file changed while reading")
    crc = _crc.crc32c(rest[: -S.CRC_BYTES], _crc.crc32c(dst))
    _check_crc(crc, rest[-S.CRC_BYTES :], expected_crc, cwhere)


def _read_compressed_into(
    out: np.ndarray,
    layout: Layout,
    coords: tuple[int, ...],
    dirpath: str,
    expected_crc: int,
    cwhere: str,
    mirror: Mirror | None,
) -> None:
    """A compressed slab chunk: its stored bytes read and checked (size bound, CRC, manifest),
    then decompressed straight into ``out``'s memory (an edge chunk through a scratch buffer:
    only its valid part belongs to ``out``)."""
    assert layout.dtype is not None and layout.codec is not None
    chunk_bytes = math.prod(layout.chunk_shape) * layout.dtype.itemsize
    f, size = _open_nofollow(_chunk_path(dirpath, layout, coords, cwhere), cwhere, mirror)
    with f:
        body = _read_stored(f, size, chunk_bytes, layout.codec, expected_crc, cwhere)
    start, n = _slab_span(layout, layout.region(coords), layout.dtype.itemsize)
    dst = out.reshape(-1).view(np.uint8)[start : start + n].data
    if n == chunk_bytes:
        layout.codec.decode_into(body, dst, cwhere)
        return
    tmp = _scratch(chunk_bytes)
    layout.codec.decode_into(body, tmp, cwhere)
    dst[:] = tmp[:n]
