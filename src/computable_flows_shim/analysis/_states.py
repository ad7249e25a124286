"""A run as a dataset: the states of one or several runs along an ``iteration`` axis
(:func:`open_run_states`; how they converge is ``_convergence.py``).

Opening reads metadata only: each checkpoint's root and leaf ``zarr.json`` (checked) and a
``stat`` of each chunk file (on an object store: the commit record).  Each dask chunk is one
stored chunk, read and checked (size, CRC32C, manifest) by ``CheckpointView.read_block``
when computed, so damage raises CheckpointCorruptError inside the dask computation, as with
``state_dataset``; ``xr.open_zarr`` would read a missing chunk as zeros.

Read once.  Successive checkpoints share most of their bytes: an incremental save hard-links
every chunk identical to the run's previous checkpoint (the observed data, a step size, a
converged region), a rollback links all of them (spec/FORMAT.md section 3).  The graph gives
each distinct chunk one task, keyed by what identifies its bytes without reading them
(``CheckpointView.chunk_identity``: the file's device and inode locally, the SHA-256 the
commit record gives on an object store) together with the CRC32C the checkpoint's manifest
expects and the dtype and shape the block decodes to; every (run, iteration) block that
holds the chunk is an alias of that task, and dask computes a key once per computation.
So a leaf that never changes over 1,000 checkpoints is read and checked once, and the parent
checkpoints a branch inherits are read once for both runs.  The manifest CRC is part of the
key so that each checkpoint's own expectation is checked: a linked file that one manifest
disagrees with gets its own task, and raises.  Chunks with equal bytes that are not one file
(written twice) are read twice: equal CRC32C and size are no proof of equal bytes, and the
graph never substitutes one chunk's bytes for another's.  On an object store the server-side
copy of an unchanged chunk is not fetched itself: its bytes are the ones its record's
SHA-256 names (``verify_checkpoint`` reads every object).  A packed leaf (spec/FORMAT.md
8.2) is one block, keyed by the pack chunk files it lies in and its place in them: a pack
chunk is read once per distinct leaf in it, and a linked pack is not read again.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim._format.tree import keystr
from computable_flows_shim._types import CheckpointId, RunId
from computable_flows_shim.checkpoints._lineage import runs_from_infos
from computable_flows_shim.checkpoints._records import CheckpointInfo
from computable_flows_shim.checkpoints._view import CheckpointView, Stored
from computable_flows_shim.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    MissingDependencyError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    import xarray

    from computable_flows_shim.checkpoints._manager import CheckpointManager

ITERATION_DIM = "iteration"
"""The dimension of checkpoints in :func:`open_run_states` (the telemetry's is ``iter``)."""
RUN_DIM = "run"
"""The dimension of runs, when several are opened."""
CHECKPOINT_COORD = "checkpoint"
"""The checkpoint id of each (run, iteration), ``""`` where that run has none."""


def _dask():
    try:
        import dask.array as da
        from dask.base import tokenize
        from dask.highlevelgraph import HighLevelGraph
    except ImportError as e:
        raise MissingDependencyError("run states are dask arrays: pip install 'computable-flows-shim[analysis]'") from e
    return da, tokenize, HighLevelGraph


# ---------------------------------------------------------------- which checkpoints


@dataclass(frozen=True)
class _Opened:
    view: CheckpointView
    leaves: dict[str, tuple[tuple, Stored]]  # stored path -> (key path, stored array)

    @property
    def info(self) -> CheckpointInfo:
        return CheckpointInfo.from_attrs(self.view.attrs, self.view.path)


class _Opener:
    """Each checkpoint's view and array leaves, from metadata only, opened once however many
    runs include it.  Names come from the store's listing (``<run>-i<iteration>``), so a
    parent run's checkpoints after a branch point are never opened; like
    ``list_checkpoints``, a checkpoint whose metadata is damaged is skipped with a
    CheckpointWarning (its chunks, read later, raise instead)."""

    def __init__(self, mgr: CheckpointManager) -> None:
        self.mgr = mgr
        self.opened: dict[CheckpointId, _Opened | None] = {}
        self._names: dict[str, list[tuple[int, CheckpointId]]] | None = None

    def names(self, run_id: RunId) -> list[tuple[int, CheckpointId]]:
        """``(iteration, id)`` of the run's committed checkpoints, by iteration."""
        if self._names is None:
            self._names = {}
            for name in self.mgr.store.names():
                m = S.CHECKPOINT_ID_RE.match(name)
                if m is not None:
                    self._names.setdefault(m.group("run"), []).append((int(m.group("it")), name))
        return sorted(self._names.get(S.validate_run_id(run_id), []))

    def _one(self, cid: CheckpointId) -> _Opened | None:
        try:
            view = self.mgr.open_checkpoint(cid)
            leaves = {node["path"]: (kp, s) for kp, node, s in view.leaves() if s is not None}
        except (CheckpointNotFoundError, StoreUnavailableError) as e:
            if isinstance(e, StoreUnavailableError):
                raise  # not damage: skipping would make the run look shorter than it is
            return None  # deleted meanwhile
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint: {e}", CheckpointWarning, stacklevel=4)
            return None
        return _Opened(view, leaves)

    def open(self, ids: list[CheckpointId]) -> list[_Opened]:
        todo = [c for c in dict.fromkeys(ids) if c not in self.opened]
        # an object store answers each request in a round trip: have 16 in flight; locally the
        # work is parsing and checking small files, which threads only slow down (the GIL)
        if len(todo) < 8 or self.mgr.store.supports_rename:
            self.opened.update((c, self._one(c)) for c in todo)
        else:
            with ThreadPoolExecutor(max_workers=16, thread_name_prefix="cfs-states") as pool:
                self.opened.update(zip(todo, pool.map(self._one, todo)))
        return [o for c in ids if (o := self.opened[c]) is not None]

    def history(self, run_id: RunId, lineage: bool) -> list[_Opened]:
        """A run's checkpoints by iteration; with ``lineage``, preceded by its parent's before
        the branch point (and the grandparent's before the parent's...), as its telemetry is."""
        out = self.open([c for _, c in self.names(run_id)])
        if not out:
            raise CheckpointNotFoundError(f"no checkpoints of run {run_id!r} in {self.mgr.store}")
        out.sort(key=lambda o: o.view.iteration)
        seen = {run_id}
        run = runs_from_infos([o.info for o in out])[0]
        while lineage and run.parent_run_id is not None and run.parent_run_id not in seen:
            seen.add(run.parent_run_id)
            cut = out[0].view.iteration
            if run.branch_iteration is not None:
                cut = min(cut, run.branch_iteration)
            names = self.names(run.parent_run_id)
            if not names:  # the parent run was deleted: the branch starts here
                break
            # the parent's earliest checkpoint too: its lineage says where the parent came from
            parent = self.open([c for i, c in names if i < cut or c == names[0][1]])
            if not parent:
                break
            run = runs_from_infos([o.info for o in parent])[0]
            out = sorted((o for o in parent if o.view.iteration < cut), key=lambda o: o.view.iteration) + out
        return out


# ---------------------------------------------------------------- the dask graph


def _read_block(view: CheckpointView, stored: Stored, coords: tuple[int, ...], lead: int, dtype: Any) -> Any:
    """One distinct stored chunk, read and checked (a task; module level so that it pickles)."""
    block = view.read_block(stored, coords)
    if dtype is not None:
        block = block.astype(dtype)
    return block.reshape((1,) * lead + block.shape)


def _digest(value: tuple) -> str:
    return hashlib.blake2b(repr(value).encode(), digest_size=16).hexdigest()


def _fill_block(shape: tuple[int, ...], dtype: Any, fill: Any) -> np.ndarray:
    """Where a run has no checkpoint (or the checkpoint no such leaf)."""
    return np.full(shape, fill, dtype=dtype)


def _hole_dtype(dtype: np.dtype) -> tuple[np.dtype, Any]:
    """The dtype and fill value of a leaf with holes: NaN (integers, booleans and the ML
    types become float64, which holds them exactly up to 2**53), None for text."""
    if dtype == np.dtype(object):
        return dtype, None
    if dtype.kind in "fc":
        return dtype, np.nan
    return np.dtype(np.float64), np.nan


@dataclass(frozen=True)
class _Leaf:
    path: str
    key_path: tuple
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    grid: tuple[int, ...]
    key_impl: str | None


def _describe(path: str, kp: tuple, s: Stored) -> _Leaf:
    lay = s.layout
    dtype = lay.dtype if lay.dtype is not None else np.dtype(object)
    return _Leaf(path, kp, lay.shape, dtype, lay.chunk_shape, lay.grid, s.key_impl)


def _stacked(leaf: _Leaf, table: list[list[_Opened | None]], multi: bool) -> Any:
    """The dask array of one leaf over (run,) iteration: one block per stored chunk, the
    blocks of one distinct chunk aliases of one read (see the module docstring)."""
    da, tokenize, HighLevelGraph = _dask()
    lead = 2 if multi else 1
    holes = any(o is None or leaf.path not in o.leaves for row in table for o in row)
    out_dtype, fill = _hole_dtype(leaf.dtype) if holes else (leaf.dtype, None)
    cast = out_dtype if out_dtype != leaf.dtype else None
    empty = math.prod(leaf.shape) == 0
    if empty:  # no chunk files: one block of the whole (empty) shape
        leaf_chunks: tuple[tuple[int, ...], ...] = tuple((n,) for n in leaf.shape)
        blocks: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((0,) * len(leaf.shape), leaf.shape)]
    else:
        leaf_chunks = tuple(
            tuple(min(c, n - j * c) for j in range(g)) for n, c, g in zip(leaf.shape, leaf.chunk_shape, leaf.grid)
        )
        blocks = [(coords, tuple(ch[i] for ch, i in zip(leaf_chunks, coords))) for coords in np.ndindex(*leaf.grid)]
    layer: dict[Any, Any] = {}
    sources: dict[str, Any] = {}
    dtypes = (str(leaf.dtype), str(out_dtype))
    index = {coords: n for n, (coords, _) in enumerate(blocks)}  # the manifest lists CRCs in this (C) order
    for ri, row in enumerate(table):
        for ii, opened in enumerate(row):
            entry = opened.leaves.get(leaf.path) if opened is not None else None
            for coords, shape in blocks:
                key = (ri, ii, *coords) if multi else (ii, *coords)
                full = (1,) * lead + shape
                if entry is None or empty:
                    layer[key] = (_fill_block, full, out_dtype, fill) if entry is None else (np.empty, full, out_dtype)
                    continue
                assert opened is not None
                view, stored = opened.view, entry[1]
                crc = stored.crcs[index[coords]]
                ident = view.chunk_identity(stored, coords)
                if ident is None:  # nothing says it is shared (missing, remote without a digest): its own task
                    ident = ("unique", view.checkpoint_id, leaf.path, coords)
                # a hash of plain ints and strings: deterministic, and 10x cheaper than dask's tokenize
                src = "cfs-chunk-" + _digest((ident, crc, shape, dtypes, lead))
                if src not in sources:
                    sources[src] = (_read_block, view, stored, coords, lead, cast)
                layer[key] = src
    # the name depends on what each block is (a chunk's key, or a hole): same bytes, same dask keys
    token = tokenize(leaf.path, str(out_dtype), multi, [v if isinstance(v, str) else v[1:] for v in layer.values()])
    name = "cfs-states-" + re.sub(r"[^A-Za-z0-9_.]", "-", leaf.path) + "-" + token
    graph: dict[Any, Any] = {(name, *k): v for k, v in layer.items()}
    graph.update(sources)
    chunks = ((1,) * len(table),) * multi + ((1,) * len(table[0]),) + leaf_chunks
    hlg = HighLevelGraph.from_collections(name, graph, dependencies=())
    return da.Array(hlg, name, chunks, dtype=out_dtype, meta=np.empty((0,) * (lead + len(leaf.shape)), out_dtype))


def open_run_states(
    mgr: CheckpointManager,
    runs: RunId | Iterable[RunId],
    leaves: str | Sequence[str] | None = None,
    *,
    lineage: bool = True,
    dims: Mapping[str, Sequence[str]] | None = None,
) -> xarray.Dataset:
    """The states of a run (or of several) as one ``xarray.Dataset`` along ``iteration``.

    One dask-backed variable per selected array leaf (``leaves``: stored paths such as
    ``"x"`` or ``"opt/w"``, as :func:`state_dataset` names them; default every array leaf),
    with dims ``("iteration", <path>.d0, ...)`` (``dims`` maps a path to names of your own).
    Given a list of runs (even of one), a ``run`` dimension comes first, over the union of
    their iterations; where a run has no checkpoint the values are NaN (``None`` for text;
    integer, boolean and ML-type leaves with such holes become float64).  The coordinate
    ``checkpoint`` names the checkpoint of each block (``""`` for a hole).

    With ``lineage`` (the default) a branch made by a rollback starts with its parent's
    checkpoints before the branch point, as its telemetry does; those blocks are the
    parent's chunks, read once for both runs.

    Opening reads metadata only (each checkpoint's ``zarr.json`` files, a ``stat`` per chunk
    file).  Each dask chunk is one stored chunk, read and checked (CRC32C, manifest) when
    computed: damage raises CheckpointCorruptError inside the computation.  A chunk shared
    by several checkpoints (a hard link, or on an object store a copy with the recorded
    SHA-256) is one task, read once per computation.

    Example::

        >>> ds = open_run_states(mgr, "exp1", ["x"])
        >>> ds["x"].sel(iteration=[100, 1000, 8000])           # three images, lazily
        >>> distance_to(ds["x"], "last").values               # reads each distinct chunk once
        >>> both = open_run_states(mgr, ["exp1", "exp1-branch"])  # dims (run, iteration, ...)
    """
    import xarray as xr

    multi = not isinstance(runs, str)
    run_ids: list[RunId] = [runs] if isinstance(runs, str) else list(runs)
    if not run_ids:
        raise ValueError("open_run_states: no runs given")
    if len(set(run_ids)) != len(run_ids):
        raise ValueError(f"open_run_states: a run is given twice: {run_ids}")
    selected = None if leaves is None else [leaves] if isinstance(leaves, str) else list(leaves)
    opener = _Opener(mgr)
    histories = [opener.history(r, lineage) for r in run_ids]
    iterations = sorted({o.view.iteration for h in histories for o in h})
    table: list[list[_Opened | None]] = []
    for h in histories:
        at = {o.view.iteration: o for o in h}
        table.append([at.get(it) for it in iterations])
    ids = [[o.view.checkpoint_id if o is not None else None for o in row] for row in table]
    distinct = {o.view.checkpoint_id: o for row in table for o in row if o is not None}

    found: dict[str, tuple[_Leaf, CheckpointId]] = {}
    for cid, o in distinct.items():
        for path, (kp, s) in o.leaves.items():
            d = _describe(path, kp, s)
            if path not in found:
                found[path] = (d, cid)
            elif (d.shape, d.dtype, d.chunk_shape, d.key_impl) != (
                (f := found[path][0]).shape,
                f.dtype,
                f.chunk_shape,
                f.key_impl,
            ):
                if selected is None or path in selected:
                    raise ValueError(
                        f"leaf {path!r} is {f.shape} {f.dtype} in chunks of {f.chunk_shape} in "
                        f"{found[path][1]!r} but {d.shape} {d.dtype} in chunks of {d.chunk_shape} in {cid!r}: "
                        "one axis needs one layout (open the checkpoints apart, or leave the leaf out with leaves=)"
                    )
    wanted = list(found) if selected is None else selected
    missing = [p for p in wanted if p not in found]
    if missing:
        raise ValueError(f"no array leaf {missing} in these checkpoints; the leaves are {sorted(found)}")
    clash = [p for p in wanted if p in (ITERATION_DIM, RUN_DIM, CHECKPOINT_COORD)]
    if clash:
        raise ValueError(f"leaf {clash[0]!r} has the name of a coordinate; leave it out with leaves=")

    dims = dict(dims or {})
    data: dict[str, Any] = {}
    for path in wanted:
        leaf = found[path][0]
        names = tuple(dims.get(path, [f"{path}.d{i}" for i in range(len(leaf.shape))]))
        if len(names) != len(leaf.shape):
            raise ValueError(f"dims[{path!r}]: {len(leaf.shape)} names needed, got {list(names)}")
        attrs: dict[str, Any] = {"key_path": keystr(leaf.key_path), "chunk_shape": list(leaf.chunk_shape)}
        if leaf.key_impl:
            attrs[S.AA_KEY_IMPL] = leaf.key_impl
        arr = _stacked(leaf, table, multi)
        if arr.dtype != leaf.dtype:
            attrs["stored_dtype"] = str(leaf.dtype)
        data[path] = xr.Variable(((RUN_DIM,) if multi else ()) + (ITERATION_DIM,) + names, arr, attrs=attrs)
    checkpoint = np.asarray([[c or "" for c in row] for row in ids], dtype=str)
    coords: dict[str, Any] = {ITERATION_DIM: np.asarray(iterations, dtype=np.int64)}
    if multi:
        coords[RUN_DIM] = np.asarray(run_ids, dtype=str)
        coords[CHECKPOINT_COORD] = ((RUN_DIM, ITERATION_DIM), checkpoint)
    else:
        coords[CHECKPOINT_COORD] = (ITERATION_DIM, checkpoint[0])
    return xr.Dataset(data, coords=coords, attrs={"runs": run_ids, "lineage": int(lineage)})


__all__ = [
    "open_run_states",
    "ITERATION_DIM",
    "RUN_DIM",
    "CHECKPOINT_COORD",
]
