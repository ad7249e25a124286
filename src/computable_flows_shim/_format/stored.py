"""A stored array, read back checked: a leaf's own Zarr array (``StoredArray``, opened by
``open_array``) or its place in a pack (``PackedLeaf``, spec/FORMAT.md 8.2), behind one
interface (``Stored``) that reads a chunk, a region (``read_region``: only the chunks it
touches) or whole arrays (``read_arrays``: many at once, each pack once).

Why one module: every way of reading stored bytes (a chunk, a region, whole arrays, a packed
leaf) goes through the same checks (safe paths, chunk sizes and CRCs, a packed leaf's own
CRC, memory bounds), which stay in one place so that no way of reading can skip one."""

from __future__ import annotations

import itertools
import math
import operator
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim._format.arrays import (
    Layout,
    Mirror,
    aligned_empty,
    mirror_rel,
    parse_array,
    read_chunk,
    read_chunk_into,
    read_json,
)
from computable_flows_shim._format.dtypes import zarr_name
from computable_flows_shim._format.io import REMOTE_POOL, run_all, run_batched
from computable_flows_shim._format.root import crc32c_of, expected_crc, metadata_crcs
from computable_flows_shim._format.tree import KEY_IMPLS
from computable_flows_shim.errors import (
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointTooLargeError,
)


def safe_join(root: str, relpath: str, where: str, verified: set[str] | None = None) -> str:
    """Join a stored '/'-path under ``root``; refuse anything that could leave it: no
    ``..``, no absolute path, and no symlink anywhere from ``root`` down (each directory on
    the way is ``lstat``-ed; ``verified`` remembers those already checked, so that a load
    of thousands of leaves checks ``state/`` once, not once per leaf).  A component that
    does not exist is left for the open to report as missing."""
    parts = relpath.split("/")
    if (
        not relpath
        or relpath.startswith("/")
        or "\\" in relpath
        or "\x00" in relpath
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise CheckpointFormatError(f"{where}: unsafe path {relpath!r}")
    verified = set() if verified is None else verified
    path = root
    for i, part in enumerate([None, *parts]):
        if part is not None:
            path = os.path.join(path, part)
        if path in verified:
            continue
        try:
            st = os.lstat(path)
        except OSError:
            return os.path.join(root, *parts)  # missing (or unreadable): the open says so
        if stat.S_ISLNK(st.st_mode):
            if part is None:
                raise CheckpointFormatError(f"{where}: {os.path.basename(root)} is a symlink")
            raise CheckpointFormatError(f"{where}: path {relpath!r} goes through a symlink")
        if i < len(parts) or stat.S_ISDIR(st.st_mode):
            verified.add(path)
    return path


def _key_impl(attrs: dict, where: str) -> str | None:
    """The PRNG key implementation ``attrs`` names (``cfs_prng_key_impl``), if one the format knows."""
    impl = attrs.get(S.AA_KEY_IMPL)
    if impl is not None and impl not in KEY_IMPLS:
        raise CheckpointFormatError(f"{where}: unknown PRNG key implementation {impl!r}")
    return impl


@dataclass
class StoredArray:
    """An array of a checkpoint, its metadata parsed and checked, bytes not read."""

    where: str
    dirpath: str
    layout: Layout
    crcs: list[int]
    attrs: dict
    mirror: Mirror | None = None
    """Where a remote checkpoint's chunks come from (None: a local directory)."""

    key_impl = property(lambda self: _key_impl(self.attrs, self.where))

    def read_block(self, coords: tuple[int, ...]) -> np.ndarray:
        """One stored chunk (full chunk shape), checked: size, CRC32C, manifest."""
        crc = self.crcs[int(np.ravel_multi_index(coords, self.layout.grid)) if coords else 0]
        return read_chunk(self.layout, coords, self.dirpath, crc, self.where, self.mirror)

    def chunk_tasks(self, out: np.ndarray) -> list[Callable[[], None]]:
        return [
            partial(read_chunk_into, out, self.layout, c, self.dirpath, crc, self.where, self.mirror)
            for c, crc in zip(self.layout.coords(), self.crcs)
        ]

    def empty(self, backed: bool = False) -> np.ndarray:
        """The array to restore into, after :meth:`check_backed` (unless ``backed``: done)."""
        layout = self.layout
        if not backed:
            self.check_backed()
        _check_fits_in_memory(self.nbytes, self.where)
        try:
            if layout.dtype is None:
                return np.empty(layout.shape, dtype=object)
            return aligned_empty(layout.shape, layout.dtype)
        except (MemoryError, ValueError) as e:
            raise CheckpointTooLargeError(f"{self.where}: cannot allocate shape {layout.shape} ({e})") from e

    @property
    def nbytes(self) -> int:
        """Bytes of the restored array (8 per string for text: the object array itself)."""
        return math.prod(self.layout.shape) * (8 if self.layout.dtype is None else self.layout.dtype.itemsize)

    def check_backed(self) -> None:
        """Before allocating a large array (or any text array, whose ``None``-filled object
        array is touched at once), check that the chunk files can hold it: a shape they
        cannot hold is damage, and must not cost its memory."""
        layout = self.layout
        per_chunk = math.prod(layout.chunk_shape)
        if layout.dtype is None:
            self._check_chunk_sizes(4 + 4 * per_chunk + 4, exact=False)  # count, one length per string, CRC
        elif self.nbytes > 64 << 20 and layout.codec is not None:
            # compressed: any size may hold a chunk (zeros shrink a thousandfold), so only the files'
            # presence is checked here; the physical-memory bound (empty) still holds
            self._check_chunk_sizes(4 + 1, exact=False)
        elif self.nbytes > 64 << 20:
            self._check_chunk_sizes(per_chunk * layout.dtype.itemsize + 4, exact=True)

    def _check_chunk_sizes(self, size: int, exact: bool) -> None:
        for c in self.layout.coords():
            key = self.layout.key(c)
            path = os.path.join(self.dirpath, *key.split("/"))
            try:
                found: int | None = os.lstat(path).st_size
            except FileNotFoundError:
                rel = mirror_rel(self.mirror, path)  # a remote checkpoint: the size its commit record gives
                found = self.mirror.size(rel) if self.mirror is not None and rel is not None else None
            except OSError:
                found = None
            if found is None:
                raise CheckpointCorruptError(f"{self.where}, chunk {key!r}: chunk file missing") from None
            if found != size if exact else found < size:
                raise CheckpointCorruptError(
                    f"{self.where}, chunk {key!r}: chunk file has {found} bytes, "
                    f"{'expected' if exact else 'too few for the shape, at least'} {size}"
                )


def open_array(
    root: str, relpath: str, where: str, mirror: Mirror | None = None, verified: set[str] | None = None
) -> StoredArray:
    """An array of the checkpoint whose ``state/`` or ``telemetry/`` directory is ``root``,
    its zarr.json checked against the checkpoint's metadata checksums when it has them
    (``verified``: directories already checked for symlinks, see :func:`_safe_join`)."""
    dirpath = safe_join(root, relpath, where, verified)
    crcs = metadata_crcs(os.path.dirname(root), where, mirror)
    key = f"{os.path.basename(root)}/{relpath}/zarr.json"
    meta = read_json(os.path.join(dirpath, "zarr.json"), where, expected_crc(crcs, key, where), mirror)
    layout, chunk_crcs, attrs = parse_array(meta, where)
    return StoredArray(where, dirpath, layout, chunk_crcs, attrs, mirror)


def _normalize_index(key: Any, shape: tuple[int, ...], name: str) -> list[int | slice]:
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1 :]
    if len(key) > len(shape):
        raise IndexError(f"too many indices for array: array is {len(shape)}-dimensional, {len(key)} were indexed")
    key = key + (slice(None),) * (len(shape) - len(key))
    out: list[int | slice] = []
    for d, (k, n) in enumerate(zip(key, shape)):
        if isinstance(k, slice):
            out.append(k)
            continue
        try:
            i = operator.index(k)
        except TypeError:
            raise TypeError(f"{name}: LazyArray supports ints, slices and '...', got {type(k).__name__}") from None
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of bounds for axis {d} with size {n}")
        out.append(i % n)
    return out


_PACK_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")


def _packed_int(v: Any, where: str, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CheckpointFormatError(f"{where}: packed leaf {what} must be a non-negative integer, got {v!r}")
    return v


@dataclass
class PackedLeaf:
    """A state leaf stored in a pack: ``size`` elements at ``offset`` of ``pack``, read as an
    array of one chunk (``layout``: the leaf's shape, one chunk of that shape)."""

    where: str
    pack: StoredArray
    offset: int
    layout: Layout
    crc: int
    attrs: dict

    @classmethod
    def of(cls, entry: Any, where: str, open_pack) -> PackedLeaf:
        """Parse and check a node's ``packed`` member; ``open_pack(name)`` opens its pack."""
        if not isinstance(entry, dict) or not isinstance(entry.get(S.TN_PACK_ARRAY), str):
            raise CheckpointFormatError(f"{where}: malformed packed leaf {entry!r}")
        rel = entry[S.TN_PACK_ARRAY]
        if not _PACK_NAME.fullmatch(rel):
            raise CheckpointFormatError(f"{where}: bad pack name {rel!r} (expected a data type name)")
        shape = entry.get(S.TN_PACK_SHAPE)
        if not isinstance(shape, list) or len(shape) > 64:
            raise CheckpointFormatError(f"{where}: bad packed leaf shape {shape!r}")
        shape = [_packed_int(n, where, "shape") for n in shape]
        offset = _packed_int(entry.get(S.TN_PACK_OFFSET), where, "offset")
        crc = _packed_int(entry.get(S.TN_PACK_CRC32C), where, "crc32c")
        if crc >= 1 << 32:
            raise CheckpointFormatError(f"{where}: packed leaf crc32c {crc} is not a 32-bit value")
        pack = open_pack(rel)
        lay = pack.layout
        if lay.dtype is None or len(lay.shape) != 1 or zarr_name(lay.dtype) != rel:
            raise CheckpointFormatError(f"{where}: pack {rel!r} must be a 1-D array of data type {rel!r}")
        size = math.prod(shape)
        if size == 0 or offset + size > lay.shape[0]:
            raise CheckpointFormatError(
                f"{where}: packed leaf of shape {shape} at offset {offset} does not fit its pack {rel!r} "
                f"(shape {list(lay.shape)})"
            )
        attrs = {S.AA_KEY_IMPL: entry[S.AA_KEY_IMPL]} if S.AA_KEY_IMPL in entry else {}
        return cls(where, pack, offset, Layout(tuple(shape), lay.dtype, tuple(shape)), crc, attrs)

    # the stored-array interface (StoredArray)
    dirpath = property(lambda self: self.pack.dirpath)
    mirror = property(lambda self: self.pack.mirror)
    crcs = property(lambda self: [self.crc])

    key_impl = property(lambda self: _key_impl(self.attrs, self.where))

    @property
    def size(self) -> int:
        return math.prod(self.layout.shape)

    def pack_chunks(self) -> range:
        """The pack chunks (grid indices) holding the leaf."""
        (c,) = self.pack.layout.chunk_shape
        return range(self.offset // c, (self.offset + self.size - 1) // c + 1)

    @property
    def label(self) -> str:
        """``packed/float32[64:84]``: its pack and element range."""
        return f"{S.PACKED_GROUP}/{os.path.basename(self.dirpath)}[{self.offset}:{self.offset + self.size}]"

    @property
    def nbytes(self) -> int:
        assert self.layout.dtype is not None
        return self.size * self.layout.dtype.itemsize

    def check_backed(self) -> None:
        """Nothing to check beyond its pack's (read with it)."""

    def from_pack(self, flat: np.ndarray) -> np.ndarray:
        """The leaf out of its whole pack's elements ``flat`` (a view), checked (:meth:`checked`)."""
        return self.checked(flat[self.offset : self.offset + self.size])

    def checked(self, part: np.ndarray) -> np.ndarray:
        """The leaf's elements ``part`` in its shape, once their CRC32C matches the pytree's."""
        got = crc32c_of(np.ascontiguousarray(part).view(np.uint8).data)
        if got != self.crc:
            raise CheckpointCorruptError(
                f"{self.where}: packed leaf does not match its CRC32C in the pytree "
                f"(got {got:#010x}, expected {self.crc:#010x})"
            )
        return part.reshape(self.layout.shape)

    def read_block(self, coords: tuple[int, ...]) -> np.ndarray:
        """The whole leaf (its one chunk), reading only the pack chunks it spans."""
        part, _ = read_region(self.pack, slice(self.offset, self.offset + self.size), self.where)
        return self.checked(part)


Stored = StoredArray | PackedLeaf
"""A state leaf's stored form: its own array, or its place in a pack (spec/FORMAT.md 8.2)."""


def read_region(stored: Stored, key: Any, name: str) -> tuple[np.ndarray, int]:
    """``stored[key]`` for basic indexing (ints, slices with steps, ``...``), reading and
    checking only the chunks it touches; returns the result and how many chunks were read."""
    shape = stored.layout.shape
    idx = _normalize_index(key, shape, name)
    layout = stored.layout
    dtype = layout.dtype if layout.dtype is not None else np.dtype(object)
    chunks_read = 0
    ranges = [range(k, k + 1) if isinstance(k, int) else range(*k.indices(n)) for k, n in zip(idx, shape)]
    box_lo = [min(r[0], r[-1]) if len(r) else 0 for r in ranges]
    box_hi = [max(r[0], r[-1]) + 1 if len(r) else 0 for r in ranges]
    buf = np.empty([hi - lo for lo, hi in zip(box_lo, box_hi)], dtype=dtype)
    if buf.size:
        per_dim: list[Sequence[int]] = []
        for r, c in zip(ranges, layout.chunk_shape):
            if abs(r.step) <= c:
                lo, hi = min(r[0], r[-1]), max(r[0], r[-1])
                per_dim.append(range(lo // c, hi // c + 1))
            else:
                per_dim.append(sorted({i // c for i in r}))
        for coords in itertools.product(*per_dim):
            chunk = stored.read_block(coords)
            chunks_read += 1
            region = layout.region(coords)
            src, dst = [], []
            for s, lo, hi in zip(region, box_lo, box_hi):
                a, b = max(s.start, lo), min(s.stop, hi)
                src.append(slice(a - s.start, b - s.start))
                dst.append(slice(a - lo, b - lo))
            buf[tuple(dst)] = chunk[tuple(src)]
    rel = tuple(_relative(k, r, lo) for k, r, lo in zip(idx, ranges, box_lo))
    out = buf[rel]
    # numpy gives a 0-d array (not a scalar) for a[...]; so do we
    has_ellipsis = key is Ellipsis or (isinstance(key, tuple) and any(k is Ellipsis for k in key))
    return (np.asarray(out) if has_ellipsis else out), chunks_read


def _relative(k: int | slice, r: range, lo: int) -> int | slice:
    """Index ``k`` (covering ``r``) re-expressed inside a buffer that starts at ``lo``."""
    if isinstance(k, int):
        return k - lo
    if not len(r):
        return slice(0, 0)
    stop = r[-1] - lo + (1 if r.step > 0 else -1)
    return slice(r.start - lo, stop if stop >= 0 else None, r.step)


def _check_fits_in_memory(nbytes: int, where: str) -> None:
    """Refuse to restore more than the machine's physical memory: the chunk files may be
    sparse, so a hostile checkpoint could otherwise make a load fill all memory."""
    sysconf = getattr(os, "sysconf", None)  # not on Windows: no bound there
    if sysconf is None:
        return
    try:
        total = sysconf("SC_PAGE_SIZE") * sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if nbytes > total:
        raise CheckpointTooLargeError(f"{where}: restoring needs {nbytes} bytes, more than this machine's {total}")


def stored_arrays(leaves: Sequence[Stored]) -> list[StoredArray]:
    """The arrays holding ``leaves``: their own, then each pack once."""
    packs = {id(a.pack): a.pack for a in leaves if isinstance(a, PackedLeaf)}
    return [a for a in leaves if isinstance(a, StoredArray)] + list(packs.values())


def read_arrays(arrays: Sequence[Stored]) -> list[np.ndarray]:
    """Every array read whole and checked; packed leaves are views of their pack, read once."""
    plain = stored_arrays(arrays)
    for a in plain:
        a.check_backed()
    if plain:
        _check_fits_in_memory(sum(a.nbytes for a in plain), plain[0].where.split(", leaf")[0])
    outs = [a.empty(backed=True) for a in plain]
    if any(a.mirror is not None for a in plain):
        # chunks of a remote checkpoint are fetched by these tasks: many requests in flight
        run_all([t for a, o in zip(plain, outs) for t in a.chunk_tasks(o)], REMOTE_POOL)
    else:
        tasks, weights = [], []
        for a, o in zip(plain, outs):
            chunk_tasks = a.chunk_tasks(o)
            tasks += chunk_tasks
            weights += [a.nbytes // max(1, len(chunk_tasks))] * len(chunk_tasks)
        run_batched(tasks, weights)  # thousands of small chunks: one thread hand-off per batch, not per chunk
    read = dict(zip((id(a) for a in plain), outs))
    return [a.from_pack(read[id(a.pack)]) if isinstance(a, PackedLeaf) else read[id(a)] for a in arrays]

__all__ = [
    "PackedLeaf",
    "Stored",
    "StoredArray",
    "open_array",
    "read_region",
    "read_arrays",
    "stored_arrays",
    "safe_join",
]
