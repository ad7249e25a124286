"""Reading a checkpoint back, checking everything and naming the leaf and chunk of any damage:
``state_leaves`` (the one walk from state leaves to their stored arrays, ``stored.py``),
``read_state`` (eager, or into a target's types and shardings), ``read_telemetry`` and
``verify_group``.  Every read of stored bytes goes through ``stored.py``'s checks."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim._format import telemetry as T
from computable_flows_shim._format.arrays import MAX_METADATA_BYTES, Mirror, open_regular, read_failed, read_json
from computable_flows_shim._format.root import crc32c_of, expected_crc, metadata_crcs, read_attrs
from computable_flows_shim._format.stored import (
    PackedLeaf,
    Stored,
    StoredArray,
    open_array,
    read_arrays,
    read_region,
    safe_join,
    stored_arrays,
)
from computable_flows_shim._format.tree import (
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
    TargetMismatchError,
)


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
            path = safe_join(dirpath, key, where, verified)
            fd, _ = open_regular(path, f"{where}, {key}", "zarr.json", mirror)
            try:
                with os.fdopen(fd, "rb") as f:
                    got = crc32c_of(f.read(MAX_METADATA_BYTES + 1))
            except OSError as e:
                raise read_failed(e, f"{where}, {key}", "zarr.json") from e
            if got != crc:
                raise CheckpointCorruptError(f"{where}: {key} does not match its checksum in the root metadata")


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
    "check_group_metadata",
    "state_leaves",
    "read_state",
    "read_telemetry",
    "verify_group",
]
