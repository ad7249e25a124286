"""Writing a checkpoint's content as one Zarr v3 group into an (empty, staging) directory:
``write_group`` (``make_dirs``, ``write_chunks``, ``write_metadata``) puts the root
``zarr.json`` with the checkpoint attributes, ``state/`` with one array per pytree leaf and
``telemetry/`` with the columns and the events log, every file and directory fsynced when
``durable``; chunks identical to the run's previous checkpoint are hard-linked; ``link_group``
fills a rollback.  Committing (rename into place) is the store's job, not this module's.
A state array with a :class:`~computable_flows_shim._format.codecs.Compression` is compressed,
unless its first chunk does not shrink (spec/FORMAT.md 8.1); a checkpoint with a compressed
array is format version 2.

Why one module: every step of one save (the arrays prepared from the state, each array's
codec decided on its first chunk, the chunks written or linked against the run's previous
checkpoint, the manifests and metadata written last) passes the same ``_Array`` records
along; split, each part would import the others' internals."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import numpy as np

from computable_flows_shim import _platform
from computable_flows_shim._format import packing as P
from computable_flows_shim._format import spec as S
from computable_flows_shim._format import telemetry as T
from computable_flows_shim._format.arrays import (
    TARGET_CHUNK_BYTES,
    Layout,
    Sink,
    array_metadata,
    chunk_buffers,
    group_metadata,
    parse_array,
    raw_chunk_buffers,
    read_json,
    read_json_raw,
    slab_chunk_shape,
    store_chunk,
    write_chunk,
    write_file,
)
from computable_flows_shim._format.codecs import Compression, LeafPolicy
from computable_flows_shim._format.dtypes import EXTENSION_NAMES
from computable_flows_shim._format.io import HAVE_SYNCFS, fsync_dir, run_all, run_batched, sync_file, syncfs
from computable_flows_shim._format.root import crc32c_of, dump_json, root_bytes
from computable_flows_shim._format.tree import (
    Leaf,
    flatten,
)
from computable_flows_shim._types import PyTree
from computable_flows_shim.errors import (
    CheckpointError,
    CheckpointWriteError,
)

TELEMETRY_CHUNK = 65536
"""Samples per telemetry chunk."""


@dataclass
class ShardedData:
    """A sharded ``jax.Array`` leaf, never gathered: the blocks this process writes (its
    addressable shards with ``replica_id == 0``), each ``(index, data)`` with ``index`` the
    block's region of the global array and ``data`` the shard's single-device array
    (copied to host, that shard alone, when written) or its host snapshot."""

    shape: tuple[int, ...]
    dtype: np.dtype
    block_shape: tuple[int, ...]
    blocks: list[tuple[tuple[slice, ...], Any]]
    is_global: bool = False  # spans several processes (not fully addressable)

    @classmethod
    def of(cls, x: jax.Array) -> ShardedData:
        shape = tuple(x.shape)
        blocks = []
        for shard in x.addressable_shards:
            if shard.replica_id == 0:
                index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(shard.index, shape))
                blocks.append((index, shard.data))
        return cls(shape, np.dtype(x.dtype), tuple(x.sharding.shard_shape(x.shape)), blocks, not x.is_fully_addressable)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks this process writes."""
        return sum(math.prod(s.stop - s.start for s in index) for index, _ in self.blocks) * self.itemsize

    def snapshot(self) -> ShardedData:
        """The same blocks copied to host memory (an async save's snapshot): shard by shard."""
        copies = run_batched(
            [partial(np.array, d, copy=True) for _, d in self.blocks],
            [math.prod(s.stop - s.start for s in i) * self.itemsize for i, _ in self.blocks],
        )
        blocks = [(i, c) for (i, _), c in zip(self.blocks, copies)]
        return ShardedData(self.shape, self.dtype, self.block_shape, blocks, self.is_global)


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (at least 1)."""
    best, d = 1, 1
    while d * d <= n:
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= limit:
                    best = c
        d += 1
    return best


def shard_chunk_shape(
    shape: tuple[int, ...], block: tuple[int, ...], itemsize: int, target: int = TARGET_CHUNK_BYTES
) -> tuple[int, ...]:
    """The chunk shape of a sharded array: its shard block, subdivided along the leading
    axes (by divisors, so chunks nest in shards) while a chunk exceeds ``target`` bytes.
    A block that is the whole array (replicated) gets the usual slab chunks."""
    if tuple(block) == tuple(shape):
        return slab_chunk_shape(shape, itemsize, target)
    chunk = [max(1, b) for b in block]
    for i in range(len(chunk)):
        if math.prod(chunk) * itemsize <= target:
            break
        rest = math.prod(chunk[i + 1 :]) * itemsize
        chunk[i] = _largest_divisor(chunk[i], max(1, target // rest))
    return tuple(chunk)


@dataclass
class _Array:
    path: str  # relative to the checkpoint root, '/'-separated
    data: np.ndarray | ShardedData | P.PackedData
    layout: Layout
    dims: list[str]
    attrs: dict
    compression: Compression | None = None  # asked for; ``layout.codec`` is what is written
    logged: object = None  # the append-only log whose column this is (never written to again: not copied)
    trusted: int = 0  # leading elements known identical to the base checkpoint's (a log's earlier save)


def _state_arrays(leaves: list[Leaf], compression: LeafPolicy | None = None, pack_max_bytes: int = 0) -> list[_Array]:
    """One array per leaf, except the uncompressed host leaves of at most ``pack_max_bytes``
    bytes: those go into one pack per data type (spec/FORMAT.md 8.2), the packs last."""
    out = []
    packs: dict[str, P.Pack] = {}
    for leaf in leaves:
        asked = compression(leaf.path, leaf.array) if compression is not None else None
        if asked is None and P.packable(leaf.array, pack_max_bytes):
            P.place(packs, leaf.node, leaf.array, leaf.key_impl)
            continue
        attrs = {S.AA_KEY_IMPL: leaf.key_impl} if leaf.key_impl else {}
        a: np.ndarray | ShardedData
        if isinstance(leaf.array, jax.Array):  # sharded: chunk grid = shard blocks, written shard by shard
            a = ShardedData.of(leaf.array)
            layout = Layout(a.shape, a.dtype, shard_chunk_shape(a.shape, a.block_shape, a.itemsize))
        else:
            a = np.require(leaf.array, requirements="C")
            layout = Layout(a.shape, a.dtype, slab_chunk_shape(a.shape, a.itemsize))
        out.append(
            _Array(
                f"{S.STATE_GROUP}/{leaf.path}",
                a,
                layout,
                [f"{leaf.path}.d{i}" for i in range(len(a.shape))],
                attrs,
                asked,
            )
        )
    for pack in packs.values():
        out.append(_Array(f"{S.PACKED_GROUP}/{pack.name}", pack.data(), pack.layout(), [f"{pack.name}.d0"], {}))
    return out


def _telemetry_arrays(
    cols: dict[str, np.ndarray], events: list[dict], log: object = None, logged: Any = (), trusted: int = 0
) -> list[_Array]:
    """The columns along ``iter``, then the event columns.  ``logged``: the names of columns
    of the append-only log ``log``, whose first ``trusted`` samples the base checkpoint's
    save of that log wrote."""
    out = []
    for dim, group in ((S.T_SAMPLE_DIM, cols), (S.T_EVENT_DIM, T.event_columns(events))):
        for name, col in group.items():
            dtype = None if col.dtype == object else col.dtype
            layout = Layout(col.shape, dtype, (max(1, min(TELEMETRY_CHUNK, len(col))),))
            data = col if dtype is None else np.require(col, requirements="C")
            of_log = log if dim == S.T_SAMPLE_DIM and name in logged else None
            arr = _Array(f"{S.TELEMETRY_GROUP}/{name}", data, layout, [dim], {}, None, of_log, trusted if of_log else 0)
            out.append(arr)
    return out


@dataclass
class Prepared:
    """A checkpoint's content, flattened and checked, ready to write (``copy=True``
    snapshots every array so the caller may change or free its state at once)."""

    attrs: dict
    arrays: list[_Array]

    @classmethod
    def of(
        cls,
        attrs: dict,
        state: PyTree,
        telemetry_history: Any,
        copy: bool = False,
        compression: LeafPolicy | None = None,
        pack_max_bytes: int = 0,
        prior: T.LogMark | None = None,
    ) -> Prepared:
        """``compression``: each state leaf's :class:`Compression` (or None) from its path and
        array (``codecs.compression_policy``); telemetry is never compressed.  Uncompressed
        host leaves of at most ``pack_max_bytes`` bytes are packed (0: none).  ``prior``: the
        mark of the base checkpoint's save when ``telemetry_history`` continues its
        append-only log (:class:`~computable_flows_shim._format.telemetry.AppendOnlyHistory`):
        the samples it wrote are neither checked, counted, copied nor read again."""
        tree, leaves = flatten(state)
        cols, events = T.normalize(telemetry_history, prior)
        summary = T.summarize(cols, events, attrs[S.A_ITERATION], prior)
        attrs = {**attrs, S.A_TELEMETRY_SUMMARY: summary, S.A_TREE: tree}
        log, logged = None, []
        if isinstance(telemetry_history, T.AppendOnlyHistory):
            log, logged = telemetry_history.log, [n for n in cols if telemetry_history.logged(n)]
        trusted = prior.samples if prior is not None else 0
        arrays = _state_arrays(leaves, compression, pack_max_bytes) + _telemetry_arrays(
            cols, events, log, logged, trusted
        )
        if copy:  # the snapshot of an async save: numpy copies release the GIL, so copy in parallel
            plain = [a for a in arrays if isinstance(a.data, np.ndarray) and a.logged is None]
            sizes = [a.data.nbytes for a in plain]
            copies = run_batched([partial(np.array, a.data, copy=True) for a in plain], sizes)
            for a, c in zip(plain, copies):
                a.data = c
            for a in arrays:
                if isinstance(a.data, (ShardedData, P.PackedData)):
                    a.data = a.data.snapshot()
        return cls(attrs, arrays)


@dataclass
class WriteStats:
    """What a save wrote: new bytes, and chunks hard-linked from an earlier checkpoint."""

    bytes_written: int = 0
    chunks_written: int = 0
    chunks_linked: int = 0
    bytes_linked: int = 0


_WRITTEN: dict[tuple[int, int, int, int], tuple[Layout, list[int]]] = {}
"""Layout and chunk CRCs of the array zarr.json files this process wrote, by the file's
identity (device, inode, size, mtime): the next save of the run finds its base's manifests
here instead of reading and parsing one zarr.json per leaf again (the identity survives the
commit rename; a file changed or replaced since has another).  Only a hint: a chunk is
linked only when its bytes are found identical."""
_WRITTEN_MAX = 200_000


def _file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _write_array_metadata(path: str, raw: bytes, durable: bool, layout: Layout, crcs: list[int]) -> None:
    write_file(path, [raw], durable)
    if len(_WRITTEN) >= _WRITTEN_MAX:
        _WRITTEN.clear()
    _WRITTEN[_file_identity(os.stat(path))] = (layout, crcs)


def _base_manifest(adir: str) -> tuple[Layout, list[int]]:
    path = os.path.join(adir, "zarr.json")
    hit = _WRITTEN.get(_file_identity(os.stat(path, follow_symlinks=False)))
    if hit is not None:
        return hit
    layout, crcs, _ = parse_array(read_json(path, adir), adir)
    return layout, crcs


def _base_chunks(base_dir: str | None, arr: _Array) -> list[tuple[str, int] | None]:
    """For each chunk of ``arr``: the chunk at the same grid position in ``base_dir``'s
    array of the same path, dtype and chunk shape (the shapes may differ: a telemetry
    column grows between checkpoints, and its full chunks stay the same).  Whether
    the bytes really are the same is checked when writing."""
    none: list[tuple[str, int] | None] = [None] * arr.layout.nchunks
    if base_dir is None:
        return none
    try:
        adir = os.path.join(base_dir, *arr.path.split("/"))
        layout, crcs = _base_manifest(adir)
    except (CheckpointError, OSError):
        return none
    if (layout.dtype, layout.chunk_shape, layout.separator, layout.codec) != (
        arr.layout.dtype,
        arr.layout.chunk_shape,
        arr.layout.separator,
        arr.layout.codec,
    ):
        return none
    base = {c: (os.path.join(adir, layout.key(c)), crc) for c, crc in zip(layout.coords(), crcs)}
    return [base.get(c) for c in arr.layout.coords()]


def _groups(arrays: list[_Array]) -> set[str]:
    groups = {"", S.STATE_GROUP, S.TELEMETRY_GROUP}
    for arr in arrays:
        parts = arr.path.split("/")
        groups.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return groups


def make_dirs(dirpath: str, prepared: Prepared) -> None:
    """Create every group and array directory of the checkpoint in the empty ``dirpath``."""
    for g in sorted(_groups(prepared.arrays), key=lambda p: p.count("/")):
        if g:
            os.mkdir(os.path.join(dirpath, *g.split("/")))
    run_batched([partial(os.mkdir, os.path.join(dirpath, *a.path.split("/"))) for a in prepared.arrays])


def _write_block(
    arr: _Array,
    index: tuple[slice, ...],
    data: Any,
    adir: str,
    durable: bool,
    bases: dict,
    skip: Any = None,
    sink: Sink | None = None,
) -> list[tuple[tuple[int, ...], int, int]]:
    """Write the chunks of one shard block from that shard alone, copied to host here;
    returns ``(coords, crc32c, bytes written)`` per chunk.  Chunks nest in blocks, so the
    block is an array of its own with the same chunk shape, offset in the chunk grid.
    ``skip``: the coordinates of a chunk already written (:func:`_decide_codec`)."""
    host = np.require(np.asarray(data), requirements="C")  # this shard only, never the global array
    layout = arr.layout
    block = Layout(host.shape, layout.dtype, layout.chunk_shape, layout.separator, layout.codec)
    offset = [s.start // c for s, c in zip(index, layout.chunk_shape)]
    out = []
    for local in block.coords():
        coords = tuple(o + c for o, c in zip(offset, local))
        if coords == skip:
            continue
        path = os.path.join(adir, layout.key(coords))
        crc, n = store_chunk(chunk_buffers(host, block, local), path, durable, bases.get(coords), sink)
        out.append((coords, crc, n))
    return out


def _write_one(
    data: np.ndarray | P.PackedData,
    layout: Layout,
    coords: tuple[int, ...],
    adir: str,
    durable: bool,
    base: tuple[str, int] | None,
    sink: Sink | None = None,
) -> list[tuple[tuple[int, ...], int, int]]:
    if isinstance(data, P.PackedData):
        path = os.path.join(adir, layout.key(coords))
        return [(coords, *store_chunk(data.chunk_buffers(layout, coords), path, durable, base, sink))]
    return [(coords, *write_chunk(data, layout, coords, adir, durable, base, sink))]


_LOGGED: dict[tuple[int, int, int, int], tuple[object, str, tuple[int, ...]]] = {}
"""The chunk files of append-only log columns this process wrote or linked, by identity (as
:data:`_WRITTEN`): which log, column (array path) and chunk each holds.  A later save of the
same log links such a file without reading it, and only a file holding that log's same
column and chunk (one replaced since, or another run's, has another identity or entry)."""


def _link_logged(src: str, dst: str, durable: bool, holds: tuple[object, str, tuple[int, ...]]) -> bool:
    """Hard-link ``src`` as ``dst`` if it is the chunk file ``holds`` (log, column, chunk)
    this process wrote (see :data:`_LOGGED`); False when it is not, or cannot be linked.  A
    durable save syncs it first (the base may have been saved with ``durable=False``); a
    failed sync raises."""
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        identity = _file_identity(os.fstat(fd))
        entry = _LOGGED.get(identity)
        if entry is None or entry[0] is not holds[0] or entry[1:] != holds[1:]:
            return False
        if durable:
            _platform.sync_data(fd)
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            return False
    finally:
        os.close(fd)
    if _file_identity(os.stat(dst, follow_symlinks=False)) != identity:  # replaced between open and link
        os.unlink(dst)
        return False
    return True


def _write_logged(
    arr: _Array, coords: tuple[int, ...], adir: str, durable: bool, base: tuple[str, int] | None, sink: Sink | None
) -> list[tuple[tuple[int, ...], int, int]]:
    """One chunk of an append-only log column: a chunk within the samples the base
    checkpoint's save of the same log wrote is linked from it unread (the log never changes
    a sample); any other is written (or linked when its bytes match, as any chunk), and its
    file is remembered for the next save."""
    path = os.path.join(adir, arr.layout.key(coords))
    end = (coords[0] + 1) * arr.layout.chunk_shape[0]
    holds = (arr.logged, arr.path, coords)
    if base is not None and end <= arr.trusted and _link_logged(base[0], path, durable, holds):
        return [(coords, base[1], 0)]
    out = _write_one(arr.data, arr.layout, coords, adir, durable, base, sink)  # type: ignore[arg-type]
    if sink is not None:
        return out  # sent, not written here: nothing to link next time
    if len(_LOGGED) >= _WRITTEN_MAX:
        _LOGGED.clear()
    _LOGGED[_file_identity(os.stat(path, follow_symlinks=False))] = holds
    return out


def _origin_block(data: ShardedData) -> Any:
    """The data of the block holding the array's first chunk, if this process writes it."""
    for index, block in data.blocks:
        if all(s.start == 0 for s in index):
            return block
    return None


def _sampled(arr: _Array) -> bool:
    """Whether the array's codec is decided on its first chunk (the switch-off rule): it asks
    for compression with a ``min_saving``, has a chunk, and is not spread over several processes
    (their chunks must share one codec, so such an array is compressed as asked)."""
    c = arr.compression
    if c is None or c.min_saving == 0 or arr.layout.nchunks == 0:
        return False
    if isinstance(arr.data, ShardedData):
        return not arr.data.is_global and _origin_block(arr.data) is not None
    return True


def _decide_codec(
    arr: _Array, adir: str, durable: bool, base_dir: str | None, sink: Sink | None = None
) -> tuple[list[tuple[tuple[int, ...], int, int]], list[tuple[str, int] | None]]:
    """The switch-off rule (spec/FORMAT.md 8.1): compress the array's first chunk; if it does
    not shrink by the ``min_saving`` asked for, the array is written uncompressed.  Sets
    ``arr.layout.codec``, writes that chunk with it, and returns it as :func:`_write_one`
    does, with the array's base chunks (which depend on the codec)."""
    assert arr.compression is not None and arr.layout.dtype is not None
    origin = (0,) * len(arr.layout.shape)
    if isinstance(arr.data, ShardedData):
        host = np.require(np.asarray(_origin_block(arr.data)), requirements="C")
        layout = Layout(host.shape, arr.layout.dtype, arr.layout.chunk_shape, arr.layout.separator)
    else:
        assert isinstance(arr.data, np.ndarray)  # packs are never compressed
        host, layout = arr.data, arr.layout
    raw = raw_chunk_buffers(host, layout, origin)
    joined = raw[0] if len(raw) == 1 else b"".join(raw)
    codec = arr.compression.chunk_codec(arr.layout.dtype.itemsize)
    encoded = codec.encode(joined)
    keep = arr.compression.keeps(len(encoded), memoryview(joined).nbytes)
    arr.layout.codec = codec if keep else None
    bases = _base_chunks(base_dir, arr)
    path = os.path.join(adir, arr.layout.key(origin))
    crc, n = store_chunk([encoded] if keep else raw, path, durable, bases[0], sink)
    return [(origin, crc, n)], bases


def _fix_codec(arr: _Array) -> None:
    """The codec of an array whose codec is not decided on a chunk (:func:`_sampled`)."""
    c, lay = arr.compression, arr.layout
    lay.codec = c.chunk_codec(lay.dtype.itemsize) if c is not None and lay.dtype is not None and lay.nchunks else None


def _chunk_weight(arr: _Array) -> int:
    """Bytes of one chunk (16 per string for text: a guess, for batching only)."""
    return math.prod(arr.layout.chunk_shape) * (arr.data.itemsize if arr.layout.dtype is not None else 16)


def write_chunks(
    dirpath: str,
    prepared: Prepared,
    durable: bool = True,
    base_dir: str | None = None,
    global_only: bool = False,
    sink: Sink | None = None,
) -> tuple[dict[str, dict[int, int]], WriteStats]:
    """Write the chunk files this process owns into ``dirpath`` (after :func:`make_dirs`):
    every chunk of a plain array, and the chunks of a sharded array's blocks this process
    holds (``global_only``: only the blocks of global arrays, those spanning processes, for the
    non-zero processes of a multi-process save: process 0 writes everything else).
    ``sink``: where chunk files go instead of ``dirpath`` (see ``arrays.Sink``).
    Returns the CRC32C of each written chunk, by array path and C-order chunk index."""
    mine = [a for a in prepared.arrays if not global_only or (isinstance(a.data, ShardedData) and a.data.is_global)]
    adirs = {a.path: os.path.join(dirpath, *a.path.split("/")) for a in mine}
    # first the compressed arrays' codecs, each decided on (and written with) its first chunk
    sampled = [a for a in mine if _sampled(a)]
    firsts = run_batched(
        [partial(_decide_codec, a, adirs[a.path], durable, base_dir, sink) for a in sampled],
        [_chunk_weight(a) for a in sampled],
    )
    decided = {a.path: first for a, first in zip(sampled, firsts)}
    tasks: list[Callable[[], Any]] = []
    weights: list[int] = []
    owners: list[_Array] = list(sampled)
    done = [written for written, _ in firsts]
    for arr in mine:
        adir = adirs[arr.path]
        skip = None
        if arr.path in decided:
            written, bases = decided[arr.path]
            skip = written[0][0]
        else:
            _fix_codec(arr)
            bases = _base_chunks(base_dir, arr)
        size = _chunk_weight(arr)
        if isinstance(arr.data, ShardedData):
            by_coords = dict(zip(arr.layout.coords(), bases))
            for index, data in arr.data.blocks:
                tasks.append(partial(_write_block, arr, index, data, adir, durable, by_coords, skip, sink))
                weights.append(math.prod(s.stop - s.start for s in index) * arr.data.itemsize)
                owners.append(arr)
            continue
        for coords, base in zip(arr.layout.coords(), bases):
            if arr.logged is not None:
                tasks.append(partial(_write_logged, arr, coords, adir, durable, base, sink))
            elif coords != skip:
                tasks.append(partial(_write_one, arr.data, arr.layout, coords, adir, durable, base, sink))
            else:
                continue
            weights.append(size)
            owners.append(arr)
    results = done + run_batched(tasks, weights)
    stats = WriteStats()
    crcs: dict[str, dict[int, int]] = {a.path: {} for a in owners}
    for arr, written in zip(owners, results):
        csize = _chunk_weight(arr)
        for coords, crc, n in written:
            crcs[arr.path][int(np.ravel_multi_index(coords, arr.layout.grid)) if coords else 0] = crc
            stats.bytes_written += n
            stats.chunks_written += n > 0
            stats.chunks_linked += n == 0
            stats.bytes_linked += csize if n == 0 else 0
    return crcs, stats


def write_metadata(dirpath: str, prepared: Prepared, crcs: dict[str, dict[int, int]], durable: bool = True) -> None:
    """Write every zarr.json (the root last), given every chunk's CRC32C, and fsync the
    directories.  Raises CheckpointWriteError if a chunk has no CRC (nobody wrote it)."""
    attrs, arrays = prepared.attrs, prepared.arrays
    groups = _groups(arrays)
    manifests: dict[str, list[int]] = {}
    for a in arrays:
        got = crcs.get(a.path, {})
        missing = [i for i in range(a.layout.nchunks) if i not in got]
        if missing:
            raise CheckpointWriteError(
                f"{a.path}: {len(missing)} of {a.layout.nchunks} chunks were not written (first: {missing[0]})"
            )
        manifests[a.path] = [got[i] for i in range(a.layout.nchunks)]

    metas = {a.path: array_metadata(a.layout, a.dims, {**a.attrs, S.AA_CRC32C: manifests[a.path]}) for a in arrays}

    def consolidated(prefix: str) -> dict | None:
        """zarr-python's inline consolidated metadata of everything under ``prefix``.

        xarray.open_zarr(path, group=...) looks for it at the root.  A reader that
        does not know an extension data type (zarr-python and bfloat16) fails on
        the whole document, so it is written only where every array below uses a
        core Zarr v3 type (spec/FORMAT.md, "Consolidated metadata")."""
        pre = prefix + "/" if prefix else ""
        inner = {p[len(pre) :]: m for p, m in metas.items() if p.startswith(pre)}
        if any(m["data_type"] in EXTENSION_NAMES for m in inner.values()):
            return None
        # zarr-python nests a flat consolidated dict only through group entries
        # that carry (empty) consolidated metadata of their own.
        inner.update({g[len(pre) :]: group_metadata({}, {}) for g in groups if g.startswith(pre) and g != prefix})
        # ...and only when parents come before their children
        return dict(sorted(inner.items(), key=lambda kv: (kv[0].count("/"), kv[0])))

    if any(a.layout.codec is not None for a in arrays):  # readable only by readers of the codecs
        attrs = {**attrs, S.A_FORMAT_VERSION: max(attrs[S.A_FORMAT_VERSION], S.FORMAT_VERSION_COMPRESSED)}
    if any(isinstance(a.data, P.PackedData) for a in arrays):  # readable only by readers of packs
        attrs = {**attrs, S.A_FORMAT_VERSION: max(attrs[S.A_FORMAT_VERSION], S.FORMAT_VERSION_PACKED)}
    docs: dict[str, dict] = {p: m for p, m in metas.items()}
    for g in groups - {""}:
        docs[g] = group_metadata({}, consolidated(g) if g in (S.STATE_GROUP, S.TELEMETRY_GROUP) else None)
    raw = {p: dump_json(d) for p, d in docs.items()}
    meta_crcs = {f"{p}/zarr.json": crc32c_of(b) for p, b in raw.items()}
    raw[""] = root_bytes({**attrs, S.A_METADATA_CRCS: meta_crcs}, consolidated(""))
    by_path = {a.path: a for a in arrays}
    run_batched(
        [
            partial(_write_array_metadata, path, b, durable, by_path[p].layout, manifests[p])
            if p in by_path
            else partial(write_file, path, [b], durable)
            for p, b in raw.items()
            for path in [os.path.join(dirpath, *p.split("/"), "zarr.json")]
        ]
    )
    if durable:
        dirs = sorted(groups | {a.path for a in arrays}, key=lambda p: p.count("/"))
        run_batched([partial(fsync_dir, os.path.join(dirpath, *d.split("/"))) for d in dirs])


@contextmanager
def made_durable(dirpath: str, durable: bool) -> Iterator[bool]:
    """How everything written into ``dirpath`` inside the block becomes durable; yields
    whether each file and directory must be synced as it is written.

    Where the platform has ``syncfs`` (:data:`HAVE_SYNCFS`), nothing is synced one by one:
    after the block, one ``syncfs`` of the file system holding ``dirpath`` makes all of it
    durable (data, sizes, directory entries and hard links, linked data saved earlier with
    ``durable=False`` included) in one journal commit instead of one per file.  Its
    descriptor is opened before the first write, so that a writeback error of any file of
    the block is reported.  A block that raises syncs nothing (nothing will be committed)."""
    if not durable or not HAVE_SYNCFS:
        yield durable
        return
    fd = os.open(dirpath, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        yield False
        syncfs(fd)
    finally:
        os.close(fd)


def write_group(
    dirpath: str, prepared: Prepared, durable: bool = True, base_dir: str | None = None, sink: Sink | None = None
) -> WriteStats:
    """Write a whole checkpoint into the empty directory ``dirpath``, durably if ``durable``
    (see :func:`made_durable`).

    ``base_dir`` is an earlier checkpoint of the same run: chunks identical to its
    chunks are hard-linked rather than written (see :func:`write_chunk`).  ``sink``: where
    the chunk files go instead (an object store's upload); the metadata is written here."""
    with made_durable(dirpath, durable) as per_file:
        make_dirs(dirpath, prepared)
        crcs, stats = write_chunks(dirpath, prepared, per_file, base_dir, sink=sink)
        write_metadata(dirpath, prepared, crcs, per_file)
    return stats


def link_group(src: str, dirpath: str, attrs: dict, durable: bool = True) -> None:
    """Fill ``dirpath`` with ``src``'s files (hard links where possible, else copies)
    and a new root zarr.json holding ``attrs``: a rollback costs no array I/O, and
    deleting either checkpoint never damages the other."""
    with made_durable(dirpath, durable) as per_file:
        _link_files(src, dirpath, attrs, per_file)


def _link_files(src: str, dirpath: str, attrs: dict, durable: bool) -> None:
    dirs = [dirpath]
    crcs: dict[str, int] = {}
    for base, subdirs, files in os.walk(src):
        rel = os.path.relpath(base, src)
        out = dirpath if rel == "." else os.path.join(dirpath, rel)
        for d in subdirs:
            os.mkdir(os.path.join(out, d))
            dirs.append(os.path.join(out, d))
        for f in files:
            if rel == "." and f == "zarr.json":
                continue
            s, d = os.path.join(base, f), os.path.join(out, f)
            if f == "zarr.json" and S.A_METADATA_CRCS not in attrs:  # a source written before checksums
                crcs[os.path.relpath(s, src).replace(os.sep, "/")] = crc32c_of(read_json_raw(s, src)[1])
            if durable:  # the source may have been saved with durable=False: never link unsynced data
                sync_file(s)  # a failure fails the rollback (a failed fsync is never retried)
            try:
                os.link(s, d, follow_symlinks=False)
            except OSError:
                shutil.copyfile(s, d, follow_symlinks=False)  # another file system, or too many links
                if durable:
                    sync_file(d)
    if S.A_METADATA_CRCS not in attrs:
        attrs = {**attrs, S.A_METADATA_CRCS: crcs}
    # the other metadata files are the source's, so its checksums of them still hold
    write_file(os.path.join(dirpath, "zarr.json"), [root_bytes(attrs, None)], durable)
    if durable:
        run_all([partial(fsync_dir, d) for d in dirs])


__all__ = [
    "Prepared",
    "ShardedData",
    "WriteStats",
    "shard_chunk_shape",
    "make_dirs",
    "write_chunks",
    "write_metadata",
    "write_group",
    "link_group",
    "made_durable",
    "TELEMETRY_CHUNK",
]
