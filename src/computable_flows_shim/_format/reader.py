"""Reading a checkpoint back, checking everything and naming the leaf and chunk of any damage:
``state_leaves`` (the one walk from state leaves to stored arrays), ``read_state`` (eager,
or into a target's types and shardings), ``read_region`` (a slice, only the chunks it
touches), ``read_telemetry`` and ``verify_group``.

Why one module: every way of reading a checkpoint back (whole, into a target, a region, the
telemetry, a verification) goes through the same checks (safe paths, metadata checksums,
chunk sizes and CRCs, memory bounds), which stay in one place so that no way of reading can
skip one."""

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

import jax
import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim._format import telemetry as T
from computable_flows_shim._format.arrays import (
    MAX_METADATA_BYTES,
    Layout,
    Mirror,
    aligned_empty,
    mirror_rel,
    open_regular,
    parse_array,
    read_chunk,
    read_chunk_into,
    read_failed,
    read_json,
)
from computable_flows_shim._format.dtypes import zarr_name
from computable_flows_shim._format.io import REMOTE_POOL, run_all, run_batched
from computable_flows_shim._format.root import crc32c_of, expected_crc, metadata_crcs, read_attrs
from computable_flows_shim._format.tree import (
    KEY_IMPLS,
    check_against_target,
    iter_leaf_nodes,
    keystr,
    scalar_value,
    target_leaves,
    unflatten,
)
from computable_flows_shim._types import PyTree
from computable_flows_shim.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointTooLargeError,
    TargetMismatchError,
)


def _safe_join(root: str, relpath: str, where: str, verified: set[str] | None = None) -> str:
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
    dirpath = _safe_join(root, relpath, where, verified)
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

    # the stored-array interface (reader.StoredArray)
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


def check_group_metadata(
    dirpath: str, prefix: str | tuple[str, ...], skip: set[str], where: str, mirror: Mirror | None = None
) -> None:
    """Check every checksummed zarr.json under ``prefix`` that is not in ``skip`` (the group
    documents a load does not otherwise read): a load detects damage anywhere in the
    metadata, not only in the files it needs."""
    crcs = metadata_crcs(dirpath, where, mirror)
    verified: set[str] = set()
    for key, crc in (crcs or {}).items():
        if key.startswith(prefix) and key not in skip:
            # the bytes only: state/zarr.json holds consolidated metadata that a load never parses
            path = _safe_join(dirpath, key, where, verified)
            fd, _ = open_regular(path, f"{where}, {key}", "zarr.json", mirror)
            try:
                with os.fdopen(fd, "rb") as f:
                    got = crc32c_of(f.read(MAX_METADATA_BYTES + 1))
            except OSError as e:
                raise read_failed(e, f"{where}, {key}", "zarr.json") from e
            if got != crc:
                raise CheckpointCorruptError(f"{where}: {key} does not match its checksum in the root metadata")


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


def _leaf_where(checkpoint: str, kp: tuple) -> str:
    return f"checkpoint {checkpoint!r}, leaf {keystr(kp)}"


def state_leaves(
    dirpath: str, attrs: dict, checkpoint: str, check_metadata: bool = True, mirror: Mirror | None = None
) -> list[tuple[tuple, dict, Stored | None]]:
    """The one walk from a checkpoint's state leaves to its stored arrays: ``(key path, tree
    node, StoredArray, PackedLeaf, or None for a Python scalar)`` in tree order, metadata
    parsed and checked, no chunk read (each pack opened once, shared by its leaves).
    ``check_metadata``: also check every other checksummed ``zarr.json`` of ``state/`` (a
    load does, to find damage anywhere in the metadata)."""
    state_dir = os.path.join(dirpath, S.STATE_GROUP)
    packed_dir = os.path.join(dirpath, S.PACKED_GROUP)
    if mirror is not None:  # every array's zarr.json is opened below: fetch them all at once
        for group in (S.STATE_GROUP, S.PACKED_GROUP):
            mirror.prefetch(group + "/")
    out: list[tuple[tuple, dict, Stored | None]] = []
    verified: set[str] = set()
    packs: dict[str, StoredArray] = {}

    def open_pack(name: str) -> StoredArray:
        if name not in packs:
            where = f"checkpoint {checkpoint!r}, pack {S.PACKED_GROUP}/{name}"
            packs[name] = open_array(packed_dir, name, where, mirror, verified)
        return packs[name]

    for kp, node in iter_leaf_nodes(attrs[S.A_TREE], where=f"checkpoint {checkpoint!r}"):
        if node["kind"] != "array":
            out.append((kp, node, None))
            continue
        where = _leaf_where(checkpoint, kp)
        if S.TN_PACKED in node:
            out.append((kp, node, PackedLeaf.of(node[S.TN_PACKED], where, open_pack)))
        else:
            out.append((kp, node, open_array(state_dir, node["path"], where, mirror, verified)))
    if check_metadata:
        arrays = {f"{S.STATE_GROUP}/{node['path']}/zarr.json" for _, node, s in out if isinstance(s, StoredArray)}
        arrays.update(f"{S.PACKED_GROUP}/{name}/zarr.json" for name in packs)
        prefixes = (S.STATE_GROUP + "/", S.PACKED_GROUP + "/")
        check_group_metadata(dirpath, prefixes, arrays, f"checkpoint {checkpoint!r}", mirror)
    return out


def _finish_leaf(node: dict, arr: np.ndarray, stored: Stored, kp: tuple, checkpoint: str) -> Any:
    impl = stored.key_impl
    if impl is not None:
        try:
            return jax.random.wrap_key_data(arr, impl=impl)  # type: ignore[arg-type]
        except (ValueError, TypeError) as e:
            raise CheckpointFormatError(f"{_leaf_where(checkpoint, kp)}: bad PRNG key data ({e})") from None
    return arr[()] if node.get("numpy_scalar") and arr.ndim == 0 else arr


def read_state(
    dirpath: str, attrs: dict, checkpoint: str, target: PyTree = None, mirror: Mirror | None = None
) -> PyTree:
    """The state pytree; with ``target``, matched and checked leaf by leaf."""
    nodes = state_leaves(dirpath, attrs, checkpoint, mirror=mirror)
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
    to_device: dict[bool, list[int]] = {True: [], False: []}  # leaf indices, by "has a sharding"
    for kp, expected in pairs:
        node, s = by_kp[kp]
        if s is None:
            leaves.append(scalar_value(node, _leaf_where(checkpoint, kp)))
            continue
        if kp in sharded:
            # each device reads only the chunks its shard touches: the whole array is never on the host
            def region(index: Any, s: Stored = s, kp: tuple = kp) -> np.ndarray:
                return read_region(s, index, keystr(kp))[0]

            leaves.append(jax.make_array_from_callback(s.layout.shape, expected.sharding, region))
            continue
        v = _finish_leaf(node, arrays[id(s)], s, kp, checkpoint)
        if isinstance(expected, (jax.Array, jax.ShapeDtypeStruct)):
            to_device[getattr(expected, "sharding", None) is not None].append(len(leaves))
        elif isinstance(expected, np.generic) and isinstance(v, np.ndarray):
            v = v[()]
        leaves.append(v)
    # one transfer call for all leaves (JAX batches them); on the CPU, the aligned host
    # buffers are adopted without a copy
    if to_device[True]:
        shardings = [pairs[i][1].sharding for i in to_device[True]]
        for i, v in zip(to_device[True], jax.device_put([leaves[i] for i in to_device[True]], shardings)):
            leaves[i] = v
    if to_device[False]:
        for i, v in zip(to_device[False], jax.device_put([leaves[i] for i in to_device[False]])):
            leaves[i] = v
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _multi_device(expected: Any) -> bool:
    """A target leaf whose sharding spans several devices (PRNG keys excluded)."""
    sharding = getattr(expected, "sharding", None)
    dtype = getattr(expected, "dtype", None)
    if sharding is None or dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return False
    return len(sharding.device_set) > 1


def read_telemetry(dirpath: str, checkpoint: str, mirror: Mirror | None = None) -> dict:
    """The telemetry history: ``{column: 1-D array, ..., "events": [dict, ...]}``."""
    tdir = os.path.join(dirpath, S.TELEMETRY_GROUP)
    if mirror is not None:
        mirror.prefetch(S.TELEMETRY_GROUP + "/")
    names = _telemetry_names(tdir, checkpoint, mirror)
    stored = [open_array(tdir, n, f"checkpoint {checkpoint!r}, telemetry column {n!r}", mirror) for n in names]
    cols = dict(zip(names, read_arrays(stored)))
    ev = {k: cols.pop(k) for k in (S.T_EVENT_ITER, S.T_EVENT_TYPE, S.T_EVENT_PAYLOAD)}
    try:
        cols["events"] = T.events_from_columns(ev)  # type: ignore[assignment]
    except (ValueError, TypeError, RecursionError) as e:
        raise CheckpointCorruptError(f"checkpoint {checkpoint!r}, telemetry events: {e}") from None
    return cols


def _telemetry_names(tdir: str, checkpoint: str, mirror: Mirror | None) -> list[str]:
    """The telemetry arrays: every child directory (each must be a valid array); with
    metadata checksums, exactly the columns they list (a lost or added column is damage)."""
    where = f"checkpoint {checkpoint!r}, telemetry"
    if os.path.islink(tdir):
        raise CheckpointFormatError(f"{where}: telemetry is a symlink")
    crcs = metadata_crcs(os.path.dirname(tdir), f"checkpoint {checkpoint!r}", mirror)
    key = f"{S.TELEMETRY_GROUP}/zarr.json"
    read_json(os.path.join(tdir, "zarr.json"), where, expected_crc(crcs, key, where), mirror)
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
        arrays = stored_arrays([s for _, _, s in state_leaves(dirpath, attrs, checkpoint) if s is not None])
        tdir = os.path.join(dirpath, S.TELEMETRY_GROUP)
        arrays += [
            open_array(tdir, n, f"checkpoint {checkpoint!r}, telemetry column {n!r}")
            for n in _telemetry_names(tdir, checkpoint, None)
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


__all__ = [
    "PackedLeaf",
    "Stored",
    "StoredArray",
    "open_array",
    "read_region",
    "check_group_metadata",
    "read_arrays",
    "state_leaves",
    "read_state",
    "read_telemetry",
    "verify_group",
]
