"""Lazy xarray/dask views of checkpoints, read through the verified chunk reader.

``xr.open_zarr`` and ``da.from_zarr`` read our arrays too (spec/FORMAT.md), but through
zarr-python, which returns the fill value for a missing chunk and never looks at the
per-chunk CRC manifest: damage would be read as zeros.  The views here build each dask
chunk from exactly one stored chunk with :func:`_arrays.read_chunk`, which checks the
size, the CRC32C trailer and the manifest, so a damaged checkpoint raises
``CheckpointCorruptError`` naming the leaf and chunk, even deep inside a dask reduction.
One dask chunk per stored chunk keeps reductions out of core: dask holds a few chunks
(4 MiB each at most) at a time, whatever the size of the state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _codec
from . import _spec as S
from ._arrays import read_chunk
from ._tree import iter_leaf_nodes, keystr, scalar_value
from ._view import CheckpointView, LazyArray, deleted_while_reading
from .errors import CheckpointNotFoundError, MissingDependencyError

if TYPE_CHECKING:
    import dask.array
    import xarray

    from ._manager import CheckpointManager

RUN_COORD = "run"
"""Coordinate along ``iter`` naming the run of each telemetry sample (``open_telemetry``)."""
EVENT_RUN_COORD = "event_run"
"""Coordinate along ``event`` naming the run of each event (``open_telemetry``)."""


def _dask_array_module():
    try:
        import dask.array as da
    except ImportError as e:
        raise MissingDependencyError(
            "lazy xarray/dask views need dask: pip install 'computable-flows-shim[analysis]'"
        ) from e
    return da


def _read_block(stored: _codec.StoredArray, coords: tuple[int, ...], crc: int, checkpoint: tuple[str, str]):
    """One dask chunk: one stored chunk, checked (a task; module level so that it pickles)."""
    with deleted_while_reading(*checkpoint):
        return read_chunk(stored.layout, coords, stored.dirpath, crc, stored.where)


def _dask_from_stored(stored: _codec.StoredArray, name: str, checkpoint: tuple[str, str]) -> dask.array.Array:
    da = _dask_array_module()
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    lay = stored.layout
    dtype = lay.dtype if lay.dtype is not None else np.dtype(object)
    if lay.nchunks == 0:  # an empty array has no chunk files
        return da.from_array(np.empty(lay.shape, dtype), chunks=lay.shape or ())
    chunks = tuple(tuple(min(c, n - j * c) for j in range(g)) for n, c, g in zip(lay.shape, lay.chunk_shape, lay.grid))
    # the name depends on the location and the CRC manifest: same bytes, same dask keys
    key = "cfs-" + name.replace("/", "-") + "-" + tokenize(stored.dirpath, stored.crcs, lay.shape, str(dtype))
    graph: dict[Any, Any] = {
        (key, *coords): (_read_block, stored, coords, crc, checkpoint) for coords, crc in zip(lay.coords(), stored.crcs)
    }
    hlg = HighLevelGraph.from_collections(key, graph, dependencies=())
    return da.Array(hlg, key, chunks, dtype=dtype, meta=np.empty((0,) * len(lay.shape), dtype))


def lazy_array_to_dask(array: LazyArray) -> dask.array.Array:
    """A dask array over a :class:`LazyArray`: one dask chunk per stored chunk, each read
    and checked (CRC32C, manifest, missing file) only when computed.

    Example::

        >>> x = mgr.open_checkpoint(cid).state["x"].to_dask()
        >>> float(x.mean().compute())
    """
    checkpoint = array._checkpoint or (os.path.dirname(array._s.dirpath), array.name)
    return _dask_from_stored(array._s, array.name, checkpoint)


def _array_leaves(view: CheckpointView):
    """``(keypath, node, StoredArray | None)`` for each leaf, metadata parsed, no chunk read."""
    state_dir = os.path.join(view.path, S.STATE_GROUP)
    out: list[tuple[tuple, dict, _codec.StoredArray | None, Any]] = []
    with deleted_while_reading(view.path, view.checkpoint_id):
        for kp, node in iter_leaf_nodes(view.attrs[S.A_TREE], where=f"checkpoint {view.checkpoint_id!r}"):
            where = f"checkpoint {view.checkpoint_id!r}, leaf {keystr(kp)}"
            if node["kind"] == "scalar":
                out.append((kp, node, None, scalar_value(node, where)))
            else:
                out.append((kp, node, _codec.open_array(state_dir, node["path"], where), None))
    return out


def _json_attrs(view: CheckpointView) -> dict[str, Any]:
    """The checkpoint attributes as xarray attrs: strings and numbers as they are, objects as JSON
    text (so that ``to_netcdf``/``to_zarr`` of the dataset keep them)."""
    import json

    out: dict[str, Any] = {}
    for k, v in view.attrs.items():
        if k == S.A_TREE or k in (S.A_METADATA_CRCS, S.A_ROOT_CRC):  # structure and checksums: not for users
            continue
        out[k] = v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else json.dumps(v)
    return out


def _scalar_name(kp: tuple) -> str:
    return "/".join(str(k) for k in kp) or "%root"


def state_dataset(
    view: CheckpointView, dims: Mapping[str, Sequence[str]] | None = None, *, scalars: bool = True
) -> xarray.Dataset:
    """A checkpoint's state as an ``xarray.Dataset`` of dask-backed variables (nothing read yet).

    One variable per array leaf, named by its stored path (``x``, ``opt/0``; the key path is
    in the variable's ``key_path`` attr), with the format's dimension names
    ``<path>.d<i>`` unless ``dims`` maps that path to names of your own.  Python scalar
    leaves become 0-d numpy variables (``scalars=False`` leaves them out); ``None`` leaves
    are skipped.  The checkpoint attributes are the dataset's attrs (objects as JSON text).

    Reductions run out of core: each dask chunk is one stored chunk, read and checked
    (CRC32C, manifest) when computed.

    Example::

        >>> ds = mgr.open_checkpoint(cid).to_xarray()
        >>> float(ds["x"].mean())                       # reads x chunk by chunk
        >>> ds["x"].isel({"x.d0": slice(0, 10)}).values
    """
    import xarray as xr

    dims = dict(dims or {})
    data: dict[str, Any] = {}
    for kp, node, stored, value in _array_leaves(view):
        if stored is None:
            name = _scalar_name(kp)
            if scalars and value is not None and name not in data:
                data[name] = xr.Variable((), np.asarray(value), attrs={"key_path": keystr(kp), "kind": "scalar"})
            continue
        path = node["path"]
        ndim = len(stored.layout.shape)
        names = tuple(dims.get(path, [f"{path}.d{i}" for i in range(ndim)]))
        if len(names) != ndim:
            raise ValueError(f"dims[{path!r}]: {ndim} names needed, got {list(names)}")
        attrs: dict[str, Any] = {"key_path": keystr(kp), "chunk_shape": list(stored.layout.chunk_shape)}
        if stored.key_impl:
            attrs[S.AA_KEY_IMPL] = stored.key_impl
        arr = _dask_from_stored(stored, path, (view.path, view.checkpoint_id))
        data[path] = xr.Variable(names, arr, attrs=attrs)
    return xr.Dataset(data, attrs=_json_attrs(view))


def state_datatree(view: CheckpointView) -> xarray.DataTree:
    """The state as an ``xarray.DataTree`` following the stored groups: the leaf at
    ``opt/w`` is variable ``w`` of node ``/opt`` (dims ``opt/w.d0``, ...), dask-backed
    like :func:`state_dataset`.

    Example::

        >>> tree = mgr.open_checkpoint(cid).to_datatree()
        >>> tree["opt"]["w"].sum().compute()
    """
    import xarray as xr

    flat = state_dataset(view, scalars=False)
    groups: dict[str, dict[str, Any]] = {"/": {}}
    for path, var in flat.data_vars.items():
        parent, _, leaf = str(path).rpartition("/")
        node = "/" + parent if parent else "/"
        groups.setdefault(node, {})[leaf] = var.variable
        while parent:  # every ancestor group exists, even when it holds no array itself
            groups.setdefault("/" + parent, {})
            parent = parent.rpartition("/")[0]
    tree = xr.DataTree.from_dict({g: xr.Dataset(v) for g, v in groups.items()})
    tree.attrs.update(flat.attrs)
    return tree


def _resolve(mgr: CheckpointManager, item: str) -> str:
    """A checkpoint id as given, else the latest checkpoint of the run of that name."""
    if S.is_checkpoint_id(item) and mgr.store.exists(item):
        return item
    latest = mgr.get_latest_checkpoint(item)
    if latest is None:
        raise CheckpointNotFoundError(f"no checkpoint or run {item!r} in {mgr.store}")
    return latest


def open_telemetry(mgr: CheckpointManager, runs: str | Iterable[str] | None = None) -> xarray.Dataset:
    """The telemetry of one or several runs as one ``xarray.Dataset``, concatenated along ``iter``.

    ``runs``: run ids (their latest checkpoint holds the whole history, including what a
    branch inherited from its parent before the rollback) or checkpoint ids; default every
    run in the store.  The coordinate ``run`` (along ``iter``) and ``event_run`` (along
    ``event``) say where each sample and event comes from; columns missing from a run are
    NaN there.  Everything is read and checked now (telemetry is small).

    Example::

        >>> ds = open_telemetry(mgr, ["exp1", "exp1-branch"])
        >>> ds["E"].where(ds["run"] == "exp1-branch", drop=True)
        >>> for run, part in ds.groupby("run"): ...
    """
    import xarray as xr

    if runs is None:
        items = sorted({i.run_id for i in mgr.list_checkpoints()})
    else:
        items = [runs] if isinstance(runs, str) else list(runs)
    samples, events, run_ids = [], [], []
    for item in items:
        view = mgr.open_checkpoint(_resolve(mgr, item))
        ds = view.telemetry
        ev_names = [n for n in ds.data_vars if S.T_EVENT_DIM in ds[n].dims]
        sm = ds.drop_vars(ev_names)
        sm = sm.assign_coords({RUN_COORD: (S.T_SAMPLE_DIM, np.full(sm.sizes.get(S.T_SAMPLE_DIM, 0), view.run_id))})
        ev = ds[ev_names]
        ev = ev.assign_coords({EVENT_RUN_COORD: (S.T_EVENT_DIM, np.full(ev.sizes.get(S.T_EVENT_DIM, 0), view.run_id))})
        samples.append(sm)
        events.append(ev)
        run_ids.append(view.run_id)
    if not samples:
        return xr.Dataset()
    opts: dict[str, Any] = {
        "data_vars": "all",
        "coords": "different",
        "compat": "equals",
        "join": "outer",
        "combine_attrs": "drop",
    }
    out = xr.merge(
        [xr.concat(samples, dim=S.T_SAMPLE_DIM, **opts), xr.concat(events, dim=S.T_EVENT_DIM, **opts)],
        compat="no_conflicts",
        join="outer",
        combine_attrs="drop",
    )
    out.attrs["runs"] = run_ids
    return out


__all__ = ["state_dataset", "state_datatree", "open_telemetry", "lazy_array_to_dask"]
