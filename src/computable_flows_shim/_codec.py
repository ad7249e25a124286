"""A checkpoint's content <-> one Zarr v3 group in a local directory.

``write_group`` fills an (empty, staging) directory: the root ``zarr.json`` with
the checkpoint attributes, ``state/`` with one array per pytree leaf, and
``telemetry/`` with the columns and the events log; every file and directory is
fsynced when ``durable``.  ``read_*`` and ``verify_group`` read it back,
checking everything and naming the leaf and chunk of any damage.  Committing
(rename into place) is the store's job, not this module's.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import crc32c as _crc
import jax
import numpy as np

from . import _spec as S
from . import _telemetry as T
from ._arrays import (
    MAX_METADATA_BYTES,
    STRING,
    TARGET_CHUNK_BYTES,
    Layout,
    array_metadata,
    chunk_buffers,
    group_metadata,
    mirror_of,
    open_regular,
    parse_array,
    read_chunk,
    read_chunk_into,
    read_failed,
    read_json,
    read_json_raw,
    slab_chunk_shape,
    store_chunk,
    write_chunk,
    write_file,
)
from ._dtypes import EXTENSION_NAMES
from ._io import POOL, REMOTE_POOL, fsync_dir, run_all, run_batched, sync_file
from ._tree import (
    KEY_IMPLS,
    Leaf,
    check_against_target,
    flatten,
    iter_leaf_nodes,
    keystr,
    scalar_value,
    target_leaves,
    unflatten,
)
from ._types import PyTree
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointTooLargeError,
    CheckpointWriteError,
    TargetMismatchError,
)

TELEMETRY_CHUNK = 65536
"""Samples per telemetry chunk."""
def _dump(doc: dict) -> bytes:
    # compact: json's C encoder only runs without indent (10x faster on large consolidated docs)
    return json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")


def _crc32c(data: bytes) -> int:
    return _crc.crc32c(data)


_ROOT_CRC_SUFFIX = re.compile(b'"' + S.A_ROOT_CRC.encode() + b'":"([0-9a-f]{8})"}}')
_ROOT_CRC_SUFFIX_LEN = len(S.A_ROOT_CRC) + 3 + 2 + 8 + 2
"""``"cfs_root_crc32c":"<8 hex digits>"}}``: how every checksummed root zarr.json ends."""


def root_bytes(attrs: dict, consolidated: dict | None) -> bytes:
    """The root zarr.json of a checkpoint: ``attributes`` is its last member and
    ``cfs_root_crc32c`` the last attribute, holding the CRC32C of every byte before that
    member (spec/FORMAT.md, "Metadata checksums").  ``attrs`` carries the CRC32C of
    every other zarr.json (``cfs_metadata_crc32c``), so all metadata is checksummed."""
    doc: dict = {"zarr_format": 3, "node_type": "group"}
    if consolidated is not None:
        doc["consolidated_metadata"] = group_metadata({}, consolidated)["consolidated_metadata"]
    doc["attributes"] = {k: v for k, v in attrs.items() if k != S.A_ROOT_CRC}
    body = _dump(doc)
    head = body[:-2] + (b"," if doc["attributes"] else b"")
    return head + b'"%s":"%08x"}}' % (S.A_ROOT_CRC.encode(), _crc32c(head))


def _check_root_crc(attrs: object, raw: bytes, where: str) -> dict[str, int] | None:
    """The checkpoint's metadata checksums (relative path -> CRC32C), after checking the
    root's own; None for a checkpoint written before checksums (it has neither)."""
    tail = _ROOT_CRC_SUFFIX.fullmatch(raw[-_ROOT_CRC_SUFFIX_LEN:])
    keys = (S.A_ROOT_CRC, S.A_METADATA_CRCS)
    if tail is None and not (isinstance(attrs, dict) and any(k in attrs for k in keys)):
        return None
    if tail is None:
        raise CheckpointCorruptError(f"{where}: root zarr.json does not end with its checksum {S.A_ROOT_CRC!r}")
    got, stored = _crc32c(raw[:-_ROOT_CRC_SUFFIX_LEN]), int(tail.group(1), 16)
    if got != stored:
        raise CheckpointCorruptError(
            f"{where}: root zarr.json does not match its checksum (CRC32C {got:#010x}, stored {stored:#010x})"
        )
    crcs = attrs.get(S.A_METADATA_CRCS) if isinstance(attrs, dict) else None
    if not isinstance(crcs, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 and _metadata_key_ok(k)
        for k, v in crcs.items()
    ):
        raise CheckpointFormatError(f"{where}: {S.A_METADATA_CRCS!r} must map zarr.json paths to CRC32C values")
    return crcs


def _metadata_key_ok(key: str) -> bool:
    parts = key.split("/")
    return (
        len(parts) >= 2
        and parts[-1] == "zarr.json"
        and "\\" not in key
        and "\x00" not in key
        and not any(p in ("", ".", "..") for p in parts)
    )


_MISSING = object()
_ROOTS: dict[tuple, tuple[dict, dict[str, int] | None]] = {}
"""Checked root attributes by (path, device, inode, size, mtime, ctime) of the root zarr.json:
a committed checkpoint never changes, so every array read can check its metadata against
the root's checksums without reading the root again."""


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
    data: np.ndarray | ShardedData
    layout: Layout
    dims: list[str]
    attrs: dict


def _state_arrays(leaves: list[Leaf]) -> list[_Array]:
    out = []
    for leaf in leaves:
        attrs = {S.AA_KEY_IMPL: leaf.key_impl} if leaf.key_impl else {}
        a: np.ndarray | ShardedData
        if isinstance(leaf.array, jax.Array):  # sharded: chunk grid = shard blocks, written shard by shard
            a = ShardedData.of(leaf.array)
            layout = Layout(a.shape, a.dtype, shard_chunk_shape(a.shape, a.block_shape, a.itemsize))
        else:
            a = np.require(leaf.array, requirements="C")
            layout = Layout(a.shape, a.dtype, slab_chunk_shape(a.shape, a.itemsize))
        out.append(
            _Array(f"{S.STATE_GROUP}/{leaf.path}", a, layout, [f"{leaf.path}.d{i}" for i in range(len(a.shape))], attrs)
        )
    return out


def _telemetry_arrays(cols: dict[str, np.ndarray], events: list[dict]) -> list[_Array]:
    out = []
    for dim, group in ((S.T_SAMPLE_DIM, cols), (S.T_EVENT_DIM, T.event_columns(events))):
        for name, col in group.items():
            dtype = None if col.dtype == object else col.dtype
            layout = Layout(col.shape, dtype, (max(1, min(TELEMETRY_CHUNK, len(col))),))
            data = col if dtype is None else np.require(col, requirements="C")
            out.append(_Array(f"{S.TELEMETRY_GROUP}/{name}", data, layout, [dim], {}))
    return out


@dataclass
class Prepared:
    """A checkpoint's content, flattened and checked, ready to write (``copy=True``
    snapshots every array so the caller may change or free its state at once)."""

    attrs: dict
    arrays: list[_Array]

    @classmethod
    def of(cls, attrs: dict, state: PyTree, telemetry_history: Any, copy: bool = False) -> Prepared:
        tree, leaves = flatten(state)
        cols, events = T.normalize(telemetry_history)
        attrs = {**attrs, S.A_TELEMETRY_SUMMARY: T.summarize(cols, events, attrs[S.A_ITERATION]), S.A_TREE: tree}
        arrays = _state_arrays(leaves) + _telemetry_arrays(cols, events)
        if copy:  # the snapshot of an async save: numpy copies release the GIL, so copy in parallel
            plain = [a for a in arrays if not isinstance(a.data, ShardedData)]
            sizes = [a.data.nbytes for a in plain]
            copies = run_batched([partial(np.array, a.data, copy=True) for a in plain], sizes)
            for a, c in zip(plain, copies):
                a.data = c
            for a in arrays:
                if isinstance(a.data, ShardedData):
                    a.data = a.data.snapshot()
        return cls(attrs, arrays)


@dataclass
class WriteStats:
    """What a save wrote: new bytes, and chunks hard-linked from an earlier checkpoint."""

    bytes_written: int = 0
    chunks_written: int = 0
    chunks_linked: int = 0
    bytes_linked: int = 0


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
        layout, crcs, _ = parse_array(read_json(os.path.join(adir, "zarr.json"), adir), adir)
    except (CheckpointError, OSError):
        return none
    if (layout.dtype, layout.chunk_shape, layout.separator) != (
        arr.layout.dtype,
        arr.layout.chunk_shape,
        arr.layout.separator,
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
    arr: _Array, index: tuple[slice, ...], data: Any, adir: str, durable: bool, bases: dict
) -> list[tuple[tuple[int, ...], int, int]]:
    """Write the chunks of one shard block from that shard alone, copied to host here;
    returns ``(coords, crc32c, bytes written)`` per chunk.  Chunks nest in blocks, so the
    block is an array of its own with the same chunk shape, offset in the chunk grid."""
    host = np.require(np.asarray(data), requirements="C")  # this shard only, never the global array
    layout = arr.layout
    block = Layout(host.shape, layout.dtype, layout.chunk_shape, layout.separator)
    offset = [s.start // c for s, c in zip(index, layout.chunk_shape)]
    out = []
    for local in block.coords():
        coords = tuple(o + c for o, c in zip(offset, local))
        path = os.path.join(adir, layout.key(coords))
        crc, n = store_chunk(chunk_buffers(host, block, local), path, durable, bases.get(coords))
        out.append((coords, crc, n))
    return out


def _write_one(
    data: np.ndarray, layout: Layout, coords: tuple[int, ...], adir: str, durable: bool, base: tuple[str, int] | None
) -> list[tuple[tuple[int, ...], int, int]]:
    return [(coords, *write_chunk(data, layout, coords, adir, durable, base))]


def _chunk_weight(arr: _Array) -> int:
    """Bytes of one chunk (16 per string for text: a guess, for batching only)."""
    return math.prod(arr.layout.chunk_shape) * (arr.data.itemsize if arr.layout.dtype is not None else 16)


def write_chunks(
    dirpath: str,
    prepared: Prepared,
    durable: bool = True,
    base_dir: str | None = None,
    global_only: bool = False,
) -> tuple[dict[str, dict[int, int]], WriteStats]:
    """Write the chunk files this process owns into ``dirpath`` (after :func:`make_dirs`):
    every chunk of a plain array, and the chunks of a sharded array's blocks this process
    holds (``global_only``: only the blocks of global arrays, those spanning processes, for the
    non-zero processes of a multi-process save: process 0 writes everything else).
    Returns the CRC32C of each written chunk, by array path and C-order chunk index."""
    tasks: list[Callable[[], Any]] = []
    weights: list[int] = []
    owners: list[_Array] = []
    for arr in prepared.arrays:
        if global_only and not (isinstance(arr.data, ShardedData) and arr.data.is_global):
            continue
        adir = os.path.join(dirpath, *arr.path.split("/"))
        bases = _base_chunks(base_dir, arr)
        size = _chunk_weight(arr)
        if isinstance(arr.data, ShardedData):
            by_coords = dict(zip(arr.layout.coords(), bases))
            for index, data in arr.data.blocks:
                tasks.append(partial(_write_block, arr, index, data, adir, durable, by_coords))
                weights.append(math.prod(s.stop - s.start for s in index) * arr.data.itemsize)
                owners.append(arr)
            continue
        for coords, base in zip(arr.layout.coords(), bases):
            tasks.append(partial(_write_one, arr.data, arr.layout, coords, adir, durable, base))
            weights.append(size)
            owners.append(arr)
    results = run_batched(tasks, weights)
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

    docs: dict[str, dict] = {p: m for p, m in metas.items()}
    for g in groups - {""}:
        docs[g] = group_metadata({}, consolidated(g) if g in (S.STATE_GROUP, S.TELEMETRY_GROUP) else None)
    raw = {p: _dump(d) for p, d in docs.items()}
    meta_crcs = {f"{p}/zarr.json": _crc32c(b) for p, b in raw.items()}
    raw[""] = root_bytes({**attrs, S.A_METADATA_CRCS: meta_crcs}, consolidated(""))
    run_batched(
        [partial(write_file, os.path.join(dirpath, *p.split("/"), "zarr.json"), [b], durable) for p, b in raw.items()]
    )
    if durable:
        dirs = sorted(groups | {a.path for a in arrays}, key=lambda p: p.count("/"))
        run_batched([partial(fsync_dir, os.path.join(dirpath, *d.split("/"))) for d in dirs])


def write_group(dirpath: str, prepared: Prepared, durable: bool = True, base_dir: str | None = None) -> WriteStats:
    """Write a whole checkpoint into the empty directory ``dirpath``.

    ``base_dir`` is an earlier checkpoint of the same run: chunks identical to its
    chunks are hard-linked rather than written (see :func:`write_chunk`)."""
    make_dirs(dirpath, prepared)
    crcs, stats = write_chunks(dirpath, prepared, durable, base_dir)
    write_metadata(dirpath, prepared, crcs, durable)
    return stats


def link_group(src: str, dirpath: str, attrs: dict, durable: bool = True) -> None:
    """Fill ``dirpath`` with ``src``'s files (hard links where possible, else copies)
    and a new root zarr.json holding ``attrs``: a rollback costs no array I/O, and
    deleting either checkpoint never damages the other."""
    import shutil

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
                crcs[os.path.relpath(s, src).replace(os.sep, "/")] = _crc32c(read_json_raw(s, src)[1])
            if durable:  # the source may have been saved with durable=False: never link unsynced data
                sync_file(s)  # a failure fails the rollback (a failed fsync is never retried)
            try:
                os.link(s, d, follow_symlinks=False)
            except OSError:
                shutil.copyfile(s, d, follow_symlinks=False)
                if durable:
                    fd = os.open(d, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
    if S.A_METADATA_CRCS not in attrs:
        attrs = {**attrs, S.A_METADATA_CRCS: crcs}
    # the other metadata files are the source's, so its checksums of them still hold
    write_file(os.path.join(dirpath, "zarr.json"), [root_bytes(attrs, None)], durable)
    if durable:
        run_all([partial(fsync_dir, d) for d in dirs])


# ---------------------------------------------------------------- reading


def _root_key(path: str, st: os.stat_result) -> tuple:
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def metadata_crcs(dirpath: str, where: str) -> dict[str, int] | None:
    """The checked metadata checksums of the checkpoint at ``dirpath`` (None: written before them)."""
    path = os.path.join(dirpath, "zarr.json")
    try:
        hit = _ROOTS.get(_root_key(path, os.lstat(path)), _MISSING)
    except OSError:
        hit = _MISSING
    if hit is not _MISSING:
        return hit[1]  # type: ignore[index]
    return _read_root(dirpath, where)[1]


def _expected_crc(crcs: dict[str, int] | None, key: str, where: str) -> int | None:
    if crcs is None:
        return None
    crc = crcs.get(key)
    if crc is None:
        raise CheckpointCorruptError(f"{where}: {key} is not in the checkpoint's metadata checksums (added?)")
    return crc


def read_attrs(dirpath: str, where: str) -> dict:
    """The checkpoint attributes, after checking format name and version and the root's checksum."""
    return _read_root(dirpath, where)[0]


def _read_root(dirpath: str, where: str) -> tuple[dict, dict[str, int] | None]:
    path = os.path.join(dirpath, "zarr.json")
    doc, raw, st = read_json_raw(path, where)
    attrs, crcs = parse_root(doc, raw, where)
    if len(_ROOTS) > 256:
        _ROOTS.clear()
    _ROOTS[_root_key(path, st)] = (attrs, crcs)
    return attrs, crcs


def parse_root(doc: dict, raw: bytes, where: str) -> tuple[dict, dict[str, int] | None]:
    """Check a parsed root zarr.json (``raw``: its bytes); returns its attributes and metadata checksums."""
    a = doc.get("attributes")
    if isinstance(a, dict) and a.get(S.A_FORMAT) == S.FORMAT_NAME:  # a newer version may checksum differently
        v = a.get(S.A_FORMAT_VERSION)
        if isinstance(v, int) and not isinstance(v, bool) and v > S.FORMAT_VERSION:
            raise CheckpointFormatError(
                f"{where}: format_version {v} is newer than this library reads ({S.FORMAT_VERSION}); upgrade"
            )
    crcs = _check_root_crc(a, raw, where)
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise CheckpointFormatError(f"{where}: root is not a Zarr v3 group")
    attrs = doc.get("attributes")
    if not isinstance(attrs, dict) or attrs.get(S.A_FORMAT) != S.FORMAT_NAME:
        raise CheckpointFormatError(f"{where}: not a {S.FORMAT_NAME} checkpoint")
    version = attrs.get(S.A_FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointFormatError(f"{where}: bad format_version {version!r}")
    if version > S.FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where}: format_version {version} is newer than this library reads ({S.FORMAT_VERSION}); upgrade"
        )
    for key, kind in ((S.A_RUN_ID, str), (S.A_CHECKPOINT_ID, str), (S.A_ITERATION, int), (S.A_TREE, dict)):
        if not isinstance(attrs.get(key), kind) or isinstance(attrs.get(key), bool):
            raise CheckpointFormatError(f"{where}: attribute {key!r} missing or not a {kind.__name__}")
    return attrs, crcs


def _safe_join(root: str, relpath: str, where: str) -> str:
    """Join a stored '/'-path under ``root``; refuse anything that could leave it."""
    parts = relpath.split("/")
    if (
        not relpath
        or relpath.startswith("/")
        or "\\" in relpath
        or "\x00" in relpath
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise CheckpointFormatError(f"{where}: unsafe path {relpath!r}")
    path = os.path.join(root, *parts)
    # no symlink anywhere from the checkpoint down: not root (state/, telemetry/), not on the way
    if os.path.islink(root):
        raise CheckpointFormatError(f"{where}: {os.path.basename(root)} is a symlink")
    real_root = os.path.realpath(root)
    if os.path.realpath(path) != os.path.join(real_root, *parts):
        raise CheckpointFormatError(f"{where}: path {relpath!r} goes through a symlink")
    return path


@dataclass
class StoredArray:
    """An array of a checkpoint, its metadata parsed and checked, bytes not read."""

    where: str
    dirpath: str
    layout: Layout
    crcs: list[int]
    attrs: dict

    @property
    def key_impl(self) -> str | None:
        impl = self.attrs.get(S.AA_KEY_IMPL)
        if impl is not None and impl not in KEY_IMPLS:
            raise CheckpointFormatError(f"{self.where}: unknown PRNG key implementation {impl!r}")
        return impl

    def chunk_tasks(self, out: np.ndarray) -> list[Callable[[], None]]:
        return [
            partial(read_chunk_into, out, self.layout, c, self.dirpath, crc, self.where)
            for c, crc in zip(self.layout.coords(), self.crcs)
        ]

    def empty(self, backed: bool = False) -> np.ndarray:
        """The array to restore into, after :meth:`check_backed` (unless ``backed``: done)."""
        layout = self.layout
        if not backed:
            self.check_backed()
        _check_fits_in_memory(self.nbytes, self.where)
        try:
            return np.empty(layout.shape, dtype=object if layout.dtype is None else layout.dtype)
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
        elif self.nbytes > 64 << 20:
            self._check_chunk_sizes(per_chunk * layout.dtype.itemsize + 4, exact=True)

    def _check_chunk_sizes(self, size: int, exact: bool) -> None:
        for c in self.layout.coords():
            key = self.layout.key(c)
            path = os.path.join(self.dirpath, *key.split("/"))
            try:
                found: int | None = os.lstat(path).st_size
            except FileNotFoundError:
                hit = mirror_of(path)  # a remote checkpoint: the size its commit record gives
                found = hit[0].size(hit[1]) if hit is not None else None
            except OSError:
                found = None
            if found is None:
                raise CheckpointCorruptError(f"{self.where}, chunk {key!r}: chunk file missing") from None
            if found != size if exact else found < size:
                raise CheckpointCorruptError(
                    f"{self.where}, chunk {key!r}: chunk file has {found} bytes, "
                    f"{'expected' if exact else 'too few for the shape, at least'} {size}"
                )


def open_array(root: str, relpath: str, where: str) -> StoredArray:
    """An array of the checkpoint whose ``state/`` or ``telemetry/`` directory is ``root``,
    its zarr.json checked against the checkpoint's metadata checksums when it has them."""
    dirpath = _safe_join(root, relpath, where)
    crcs = metadata_crcs(os.path.dirname(root), where)
    key = f"{os.path.basename(root)}/{relpath}/zarr.json"
    meta = read_json(os.path.join(dirpath, "zarr.json"), where, _expected_crc(crcs, key, where))
    layout, chunk_crcs, attrs = parse_array(meta, where)
    return StoredArray(where, dirpath, layout, chunk_crcs, attrs)


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
            raise TypeError(
                f"{name}: LazyArray supports ints, slices and '...', got {type(k).__name__}"
            ) from None
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of bounds for axis {d} with size {n}")
        out.append(i % n)
    return out


def read_region(stored: StoredArray, key: Any, name: str) -> tuple[np.ndarray, int]:
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
        crc_index: dict[tuple[int, ...], int] = {c: i for i, c in enumerate(layout.coords())}
        for coords in itertools.product(*per_dim):
            chunk = read_chunk(layout, coords, stored.dirpath, stored.crcs[crc_index[coords]], stored.where)
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


def check_group_metadata(dirpath: str, prefix: str, skip: set[str], where: str) -> None:
    """Check every checksummed zarr.json under ``prefix`` that is not in ``skip`` (the group
    documents a load does not otherwise read): a load detects damage anywhere in the
    metadata, not only in the files it needs."""
    crcs = metadata_crcs(dirpath, where)
    for key, crc in (crcs or {}).items():
        if key.startswith(prefix) and key not in skip:
            # the bytes only: state/zarr.json holds consolidated metadata that a load never parses
            fd, _ = open_regular(_safe_join(dirpath, key, where), f"{where}, {key}", "zarr.json")
            try:
                with os.fdopen(fd, "rb") as f:
                    got = _crc32c(f.read(MAX_METADATA_BYTES + 1))
            except OSError as e:
                raise read_failed(e, f"{where}, {key}", "zarr.json") from e
            if got != crc:
                raise CheckpointCorruptError(f"{where}: {key} does not match its checksum in the root metadata")


def _check_fits_in_memory(nbytes: int, where: str) -> None:
    """Refuse to restore more than the machine's physical memory: the chunk files may be
    sparse, so a hostile checkpoint could otherwise make a load fill all memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > total:
        raise CheckpointTooLargeError(f"{where}: restoring needs {nbytes} bytes, more than this machine's {total}")


def read_arrays(arrays: list[StoredArray]) -> list[np.ndarray]:
    for a in arrays:
        a.check_backed()
    if arrays:
        _check_fits_in_memory(sum(a.nbytes for a in arrays), arrays[0].where.split(", leaf")[0])
    outs = [a.empty(backed=True) for a in arrays]
    tasks = [t for a, o in zip(arrays, outs) for t in a.chunk_tasks(o)]
    # chunks of a remote checkpoint are fetched by these tasks: many requests in flight
    run_all(tasks, REMOTE_POOL if any(mirror_of(a.dirpath) for a in arrays) else POOL)
    return outs


def _leaf_where(checkpoint: str, kp: tuple) -> str:
    return f"checkpoint {checkpoint!r}, leaf {keystr(kp)}"


def state_leaves(
    dirpath: str, attrs: dict, checkpoint: str, check_metadata: bool = True
) -> list[tuple[tuple, dict, StoredArray | None]]:
    """The one walk from a checkpoint's state leaves to its stored arrays: ``(key path, tree
    node, StoredArray or None for a Python scalar)`` in tree order, metadata parsed and
    checked, no chunk read.  ``check_metadata``: also check every other checksummed
    ``zarr.json`` of ``state/`` (a load does, to find damage anywhere in the metadata)."""
    state_dir = os.path.join(dirpath, S.STATE_GROUP)
    out: list[tuple[tuple, dict, StoredArray | None]] = []
    for kp, node in iter_leaf_nodes(attrs[S.A_TREE], where=f"checkpoint {checkpoint!r}"):
        if node["kind"] == "array":
            out.append((kp, node, open_array(state_dir, node["path"], _leaf_where(checkpoint, kp))))
        else:
            out.append((kp, node, None))
    if check_metadata:
        arrays = {f"{S.STATE_GROUP}/{node['path']}/zarr.json" for _, node, s in out if s is not None}
        check_group_metadata(dirpath, S.STATE_GROUP + "/", arrays, f"checkpoint {checkpoint!r}")
    return out


def _finish_leaf(node: dict, arr: np.ndarray, stored: StoredArray, kp: tuple, checkpoint: str) -> Any:
    impl = stored.key_impl
    if impl is not None:
        try:
            return jax.random.wrap_key_data(arr, impl=impl)  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            raise CheckpointFormatError(f"{_leaf_where(checkpoint, kp)}: bad PRNG key data ({e})") from None
    return arr[()] if node.get("numpy_scalar") and arr.ndim == 0 else arr


def read_state(dirpath: str, attrs: dict, checkpoint: str, target: PyTree = None) -> PyTree:
    """The state pytree; with ``target``, matched and checked leaf by leaf."""
    nodes = state_leaves(dirpath, attrs, checkpoint)
    if target is None:
        stored = [s for _, _, s in nodes if s is not None]
        values = dict(zip((id(s) for s in stored), read_arrays(stored)))
        by_kp = {kp: (node, s) for kp, node, s in nodes}

        def leaf_value(kp: tuple, node: dict) -> Any:
            n, s = by_kp[kp]
            if s is None:
                return scalar_value(n, _leaf_where(checkpoint, kp))
            return _finish_leaf(n, values[id(s)], s, kp, checkpoint)

        return unflatten(attrs[S.A_TREE], leaf_value)

    pairs, treedef = target_leaves(target)
    by_kp = {kp: (node, s) for kp, node, s in nodes}
    missing = [kp for kp, _ in pairs if kp not in by_kp]
    extra = sorted(set(by_kp) - {kp for kp, _ in pairs}, key=repr)
    if missing or extra:
        raise TargetMismatchError(
            f"checkpoint {checkpoint!r}: target does not match the stored tree; "
            f"missing from checkpoint: {[keystr(k) for k in missing[:5]]}, "
            f"not in target: {[keystr(k) for k in extra[:5]]}"
        )
    for kp, expected in pairs:
        node, s = by_kp[kp]
        if s is not None:
            check_against_target(
                kp, expected, s.layout.shape, s.layout.dtype or np.dtype(object), s.key_impl, checkpoint
            )
        elif hasattr(expected, "shape"):
            raise TargetMismatchError(f"{_leaf_where(checkpoint, kp)}: target expects an array, stored a Python scalar")
    sharded = {kp for kp, expected in pairs if by_kp[kp][1] is not None and _multi_device(expected)}
    needed = [s for kp, _ in pairs if (s := by_kp[kp][1]) is not None and kp not in sharded]
    arrays = dict(zip((id(s) for s in needed), read_arrays(needed)))
    leaves: list[Any] = []
    for kp, expected in pairs:
        node, s = by_kp[kp]
        if s is None:
            leaves.append(scalar_value(node, _leaf_where(checkpoint, kp)))
            continue
        if kp in sharded:
            # each device reads only the chunks its shard touches: the whole array is never on the host
            def region(index: Any, s: StoredArray = s, kp: tuple = kp) -> np.ndarray:
                return read_region(s, index, keystr(kp))[0]

            leaves.append(jax.make_array_from_callback(s.layout.shape, expected.sharding, region))
            continue
        v = _finish_leaf(node, arrays[id(s)], s, kp, checkpoint)
        if isinstance(expected, (jax.Array, jax.ShapeDtypeStruct)):
            sharding = getattr(expected, "sharding", None)
            v = jax.device_put(v, sharding) if sharding is not None else jax.device_put(v)
        elif isinstance(expected, np.generic) and isinstance(v, np.ndarray):
            v = v[()]
        leaves.append(v)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _multi_device(expected: Any) -> bool:
    """A target leaf whose sharding spans several devices (PRNG keys excluded)."""
    sharding = getattr(expected, "sharding", None)
    dtype = getattr(expected, "dtype", None)
    if sharding is None or dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return False
    return len(sharding.device_set) > 1


def read_telemetry(dirpath: str, checkpoint: str) -> dict:
    """The telemetry history: ``{column: 1-D array, ..., "events": [dict, ...]}``."""
    tdir = os.path.join(dirpath, S.TELEMETRY_GROUP)
    names = _telemetry_names(tdir, checkpoint)
    stored = [open_array(tdir, n, f"checkpoint {checkpoint!r}, telemetry column {n!r}") for n in names]
    cols = dict(zip(names, read_arrays(stored)))
    ev = {k: cols.pop(k) for k in (S.T_EVENT_ITER, S.T_EVENT_TYPE, S.T_EVENT_PAYLOAD)}
    try:
        cols["events"] = T.events_from_columns(ev)  # type: ignore[assignment]
    except (ValueError, TypeError, RecursionError) as e:
        raise CheckpointCorruptError(f"checkpoint {checkpoint!r}, telemetry events: {e}") from None
    return cols


def _telemetry_names(tdir: str, checkpoint: str) -> list[str]:
    """The telemetry arrays: every child directory (each must be a valid array); with
    metadata checksums, exactly the columns they list (a lost or added column is damage)."""
    where = f"checkpoint {checkpoint!r}, telemetry"
    if os.path.islink(tdir):
        raise CheckpointFormatError(f"{where}: telemetry is a symlink")
    crcs = metadata_crcs(os.path.dirname(tdir), f"checkpoint {checkpoint!r}")
    read_json(os.path.join(tdir, "zarr.json"), where, _expected_crc(crcs, f"{S.TELEMETRY_GROUP}/zarr.json", where))
    try:
        with os.scandir(tdir) as it:
            names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        raise CheckpointCorruptError(f"checkpoint {checkpoint!r}: telemetry group missing") from None
    except OSError as e:
        raise CheckpointCorruptError(f"{where}: cannot list the telemetry group ({e})") from None
    if crcs is not None:
        listed = {k.split("/")[1] for k in crcs if k.startswith(S.TELEMETRY_GROUP + "/") and k.count("/") == 2}
        for n in sorted(listed - set(names)):
            raise CheckpointCorruptError(f"{where}: column {n!r} missing")
        for n in sorted(set(names) - listed):
            raise CheckpointCorruptError(f"{where}: unexpected column {n!r} (not in the metadata checksums)")
    for k in (S.T_EVENT_ITER, S.T_EVENT_TYPE, S.T_EVENT_PAYLOAD):
        if k not in names:
            raise CheckpointCorruptError(f"checkpoint {checkpoint!r}, telemetry: missing {k!r}")
    return names


def verify_group(dirpath: str, checkpoint: str) -> list[str]:
    """Read every chunk of every array; return one line per problem found (empty: intact)."""
    problems: list[str] = []
    try:
        attrs = read_attrs(dirpath, f"checkpoint {checkpoint!r}")
        crcs = metadata_crcs(dirpath, f"checkpoint {checkpoint!r}")
        arrays = [s for _, _, s in state_leaves(dirpath, attrs, checkpoint) if s is not None]
        tdir = os.path.join(dirpath, S.TELEMETRY_GROUP)
        arrays += [
            open_array(tdir, n, f"checkpoint {checkpoint!r}, telemetry column {n!r}")
            for n in _telemetry_names(tdir, checkpoint)
        ]
    except CheckpointError as e:
        return [str(e)]
    expected_files = {os.path.join(dirpath, "zarr.json")}
    expected_files.update(os.path.join(dirpath, *k.split("/")) for k in crcs or {})
    for a in arrays:
        try:
            out = a.empty()
            tasks = a.chunk_tasks(out)
        except CheckpointError as e:
            problems.append(str(e))
            tasks = []
        for task in tasks:
            try:
                task()
            except CheckpointError as e:
                problems.append(str(e))
        expected_files.add(os.path.join(a.dirpath, "zarr.json"))
        expected_files.update(os.path.join(a.dirpath, *a.layout.key(c).split("/")) for c in a.layout.coords())
    for base, dirs, files in os.walk(dirpath):
        # a symlink is never part of a checkpoint, even one to a directory (which os.walk lists as one)
        for f in files + [d for d in dirs if os.path.islink(os.path.join(base, d))]:
            p = os.path.join(base, f)
            if p not in expected_files and (crcs is not None or f != "zarr.json" or os.path.islink(p)):
                problems.append(f"checkpoint {checkpoint!r}: unexpected file {os.path.relpath(p, dirpath)!r}")
    if not problems:  # the bytes are intact: now everything load checks beyond them
        try:
            read_state(dirpath, attrs, checkpoint)
            read_telemetry(dirpath, checkpoint)
        except CheckpointError as e:
            problems.append(str(e))
    return problems


__all__ = ["write_group", "read_attrs", "read_state", "read_telemetry", "verify_group", "open_array", "STRING"]
