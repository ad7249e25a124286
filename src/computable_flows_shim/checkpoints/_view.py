"""Lazy views: a checkpoint's attributes without reading arrays, its leaves as
:class:`LazyArray` whose slicing reads (and checks) only the chunks it touches,
and its telemetry as an ``xarray.Dataset``."""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from computable_flows_shim import _display as _repr
from computable_flows_shim._format import reader as _reader
from computable_flows_shim._format import spec as S
from computable_flows_shim._format.arrays import Mirror, mirror_rel
from computable_flows_shim._format.stored import PackedLeaf, Stored, StoredArray, read_region
from computable_flows_shim._format.tree import KeyPath, keystr, scalar_value, unflatten
from computable_flows_shim._types import PyTree
from computable_flows_shim.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    MissingDependencyError,
)

if TYPE_CHECKING:
    import dask.array
    import xarray


@contextmanager
def deleted_while_reading(path: str, checkpoint_id: str) -> Iterator[None]:
    """Report a checkpoint deleted under a reader as not found, not as damage.

    A delete renames the whole checkpoint directory away (spec/FORMAT.md, "Delete"), so
    a reader that opens a file afterwards finds it missing, which on its own reads as a
    corrupt checkpoint.  When the checkpoint directory itself is gone, that is what
    happened (a cleanup ran), and the reader gets CheckpointNotFoundError.
    """
    try:
        yield
    except (CheckpointCorruptError, FileNotFoundError) as e:
        if isinstance(e, CheckpointNotFoundError) or os.path.isdir(path):
            raise
        raise CheckpointNotFoundError(f"checkpoint {checkpoint_id!r} was deleted while being read ({e})") from e


class LazyArray:
    """A stored array read on demand: ``a[i:j, k]`` reads only the touched chunks.

    Supports basic indexing (ints, slices with steps, ``...``); ``np.asarray(a)``
    reads everything.  PRNG-key leaves show their raw key data (``key_impl`` says
    which implementation).
    """

    def __init__(self, stored: Stored, name: str, checkpoint: tuple[str, str] | None = None) -> None:
        self._s = stored
        self.name = name
        self.chunks_read = 0
        self._checkpoint = checkpoint  # (path, id): to tell a deleted checkpoint from damage

    @property
    def shape(self) -> tuple[int, ...]:
        return self._s.layout.shape

    @property
    def dtype(self) -> np.dtype:
        return self._s.layout.dtype if self._s.layout.dtype is not None else np.dtype(object)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return self._s.layout.chunk_shape

    @property
    def key_impl(self) -> str | None:
        return self._s.key_impl

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: math.prod(self.shape))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyArray({self.name}, shape={self.shape}, dtype={self.dtype}, chunks={self.chunk_shape})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self[...])
        return out if dtype is None else out.astype(dtype)

    def to_dask(self):
        """A ``dask.array.Array``, one dask chunk per stored chunk, each read and checked
        only when computed (see :func:`computable_flows_shim.lazy_array_to_dask`)."""
        return lazy_array_to_dask(self)

    def __getitem__(self, key: Any) -> np.ndarray:
        with deleted_while_reading(*self._checkpoint) if self._checkpoint else nullcontext():
            out, n = read_region(self._s, key, self.name)
        self.chunks_read += n
        return out


@dataclass(frozen=True)
class LeafInfo:
    """One leaf of a checkpoint's state.

    ``kind`` is ``"array"`` (stored at ``state/<path>``, or in a pack: ``packed`` names it and
    the leaf's element range, ``"packed/float32[64:84]"``) or ``"scalar"`` (a Python scalar
    kept in the ``pytree`` attribute: ``value``).  For arrays: ``chunk_shape``, ``grid``
    (chunks per dimension), ``nbytes`` (in memory) and ``disk_bytes`` (its chunk files
    and ``zarr.json``, hard links counted as files; a packed leaf: its bytes in the pack).
    PRNG-key leaves are described by their raw key data, ``key_impl`` names the implementation.
    """

    key_path: KeyPath
    kind: str
    path: str | None = None
    shape: tuple[int, ...] = ()
    dtype: str = ""
    chunk_shape: tuple[int, ...] = ()
    grid: tuple[int, ...] = ()
    nbytes: int = 0
    disk_bytes: int = 0
    key_impl: str | None = None
    value: Any = field(default=None, compare=False)
    packed: str | None = None

    @property
    def name(self) -> str:
        """How errors name the leaf: ``state['opt'][0]``."""
        return keystr(self.key_path)

    @property
    def nchunks(self) -> int:
        return math.prod(self.grid) if self.kind == "array" else 0

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "scalar":
            return {"leaf": self.name, "kind": "scalar", "value": self.value}
        return {
            "leaf": self.name,
            "kind": "array",
            "path": self.packed or f"{S.STATE_GROUP}/{self.path}",
            **({"packed": True} if self.packed else {}),
            "shape": list(self.shape),
            "dtype": self.dtype,
            "chunks": list(self.chunk_shape),
            "grid": list(self.grid),
            "nchunks": self.nchunks,
            "bytes": self.nbytes,
            "disk_bytes": self.disk_bytes,
            **({"key_impl": self.key_impl} if self.key_impl else {}),
        }


def _tree_bytes(path: str, links_once: bool = False) -> int:
    """Sizes of the regular files under ``path`` (symlinks not followed); ``links_once``: a
    file with several hard links under ``path`` counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for base, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(base, f))
            except FileNotFoundError:
                continue
            if links_once:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def checkpoint_disk_bytes(path: str) -> int:
    """Bytes of a checkpoint directory's files, each hard-linked file counted once."""
    return _tree_bytes(path, links_once=True)


class CheckpointView:
    """A committed checkpoint opened lazily (see ``CheckpointManager.open_checkpoint``)."""

    def __init__(self, path: str, attrs: dict, mirror: Mirror | None = None) -> None:
        self.path = path
        self.attrs = attrs
        self.mirror = mirror
        """Where a remote checkpoint's files come from (``Store.mirror``); None for a local one."""
        self._state: PyTree = None
        self._telemetry = None

    checkpoint_id = property(lambda self: self.attrs[S.A_CHECKPOINT_ID])
    run_id = property(lambda self: self.attrs[S.A_RUN_ID])
    iteration = property(lambda self: self.attrs[S.A_ITERATION])
    created_at = property(lambda self: self.attrs.get(S.A_CREATED_AT))
    flow_config = property(lambda self: self.attrs.get(S.A_FLOW_CONFIG) or {})
    certificates = property(lambda self: self.attrs.get(S.A_CERTIFICATES) or {})
    metadata = property(lambda self: self.attrs.get(S.A_METADATA) or {})
    lineage = property(lambda self: self.attrs.get(S.A_LINEAGE) or {})
    telemetry_summary = property(lambda self: self.attrs.get(S.A_TELEMETRY_SUMMARY) or {})

    def __repr__(self) -> str:
        try:  # leaves, layout, telemetry summary, lineage (metadata only); never fail a repr
            return _repr.view_text(self, self.describe_leaves(), checkpoint_disk_bytes(self.path))
        except Exception:  # noqa: BLE001 - e.g. deleted meanwhile: the short form still helps
            return f"<CheckpointView {self.checkpoint_id} run={self.run_id} iteration={self.iteration}>"

    def _repr_html_(self) -> str:
        """The notebook display: leaves with shape/dtype/chunks/size, attrs, telemetry summary, lineage."""
        return _repr.view_html(self, self.describe_leaves(), checkpoint_disk_bytes(self.path))

    def to_xarray(self, dims: dict | None = None):
        """The state as a dask-backed ``xarray.Dataset`` (see :func:`computable_flows_shim.state_dataset`)."""
        return state_dataset(self, dims)

    def to_datatree(self):
        """The state as a dask-backed ``xarray.DataTree`` (see :func:`computable_flows_shim.state_datatree`)."""
        return state_datatree(self)

    def leaves(self) -> list[tuple[KeyPath, dict, Stored | None]]:
        """``(key path, tree node, stored array or None for a Python scalar)`` for every leaf,
        in tree order, from metadata alone: the walk that diff, xarray, export and
        :meth:`describe_leaves` share."""
        with deleted_while_reading(self.path, self.checkpoint_id):
            return _reader.state_leaves(self.path, self.attrs, self.checkpoint_id, False, self.mirror)

    def read_block(self, stored: Stored, coords: tuple[int, ...]) -> np.ndarray:
        """One stored chunk of a leaf (from :meth:`leaves`), checked (size, CRC32C, manifest);
        a packed leaf is one chunk, the whole leaf."""
        with deleted_while_reading(self.path, self.checkpoint_id):
            return stored.read_block(coords)

    def chunk_identity(self, stored: Stored, coords: tuple[int, ...]) -> tuple | None:
        """What identifies one stored chunk's bytes without reading them (None: nothing does):
        ``("file", device, inode, size)`` locally, where a hard link (incremental saves,
        rollbacks) is one immutable file; ``("sha256", digest, size)`` for a remote object
        whose commit record gives its SHA-256 (unchanged chunks are server-side copies).
        A packed leaf: the identities of the pack chunks it spans, and its place in them."""
        if isinstance(stored, PackedLeaf):
            parts = [self.chunk_identity(stored.pack, (i,)) for i in stored.pack_chunks()]
            return None if None in parts else ("packed", stored.offset, stored.size, *parts)
        path = os.path.join(stored.dirpath, *stored.layout.key(coords).split("/"))
        rel = mirror_rel(self.mirror, path)
        if self.mirror is not None and rel is not None:
            sha, size = self.mirror.digest(rel), self.mirror.size(rel)
            return ("sha256", sha, size) if sha is not None and size is not None else None
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return ("file", st.st_dev, st.st_ino, st.st_size) if stat.S_ISREG(st.st_mode) else None

    def telemetry_columns(self) -> dict:
        """The telemetry as stored: ``{column: numpy array}`` plus ``events`` (a list of dicts)."""
        with deleted_while_reading(self.path, self.checkpoint_id):
            return _reader.read_telemetry(self.path, self.checkpoint_id, self.mirror)

    def describe_leaves(self, *, disk: bool = True) -> list[LeafInfo]:
        """Every leaf in tree order, from metadata only (no chunk is read); ``disk=False``
        skips the ``stat`` of every chunk file (``disk_bytes`` is then 0)."""
        out: list[LeafInfo] = []
        for kp, node, stored in self.leaves():
            if stored is None:
                out.append(LeafInfo(kp, "scalar", value=scalar_value(node, self._where(kp))))
                continue
            lay = stored.layout
            out.append(
                LeafInfo(
                    kp,
                    "array",
                    node["path"],
                    lay.shape,
                    lay.dtype.name if lay.dtype is not None else "string",
                    lay.chunk_shape,
                    lay.grid,
                    math.prod(lay.shape) * (lay.dtype.itemsize if lay.dtype is not None else 0),
                    (stored.nbytes if isinstance(stored, PackedLeaf) else _tree_bytes(stored.dirpath)) if disk else 0,
                    stored.key_impl,
                    packed=stored.label if isinstance(stored, PackedLeaf) else None,
                )
            )
        return out

    def _where(self, kp: KeyPath) -> str:
        return f"checkpoint {self.checkpoint_id!r}, leaf {keystr(kp)}"

    @property
    def state(self) -> PyTree:
        """The state tree with :class:`LazyArray` leaves (metadata read now, bytes on slicing)."""
        if self._state is None:
            checkpoint = (self.path, self.checkpoint_id)
            values = {
                kp: scalar_value(node, self._where(kp)) if s is None else LazyArray(s, keystr(kp), checkpoint)
                for kp, node, s in self.leaves()
            }
            with deleted_while_reading(*checkpoint):
                self._state = unflatten(self.attrs[S.A_TREE], lambda kp, node: values[kp])
        return self._state

    @property
    def telemetry(self):
        """The telemetry as an ``xarray.Dataset`` (columns along ``iter``, events along ``event``)."""
        if self._telemetry is None:
            import xarray as xr

            cols = self.telemetry_columns()
            events = cols.pop("events")
            data = {n: (S.T_SAMPLE_DIM, c) for n, c in cols.items() if n != S.T_SAMPLE_DIM}
            coords = {S.T_SAMPLE_DIM: cols[S.T_SAMPLE_DIM]} if S.T_SAMPLE_DIM in cols else {}
            ds = xr.Dataset(data, coords=coords)
            ds[S.T_EVENT_ITER] = (S.T_EVENT_DIM, np.asarray([e["iter"] for e in events], dtype=np.int64))
            ds[S.T_EVENT_TYPE] = (S.T_EVENT_DIM, np.asarray([e["type"] for e in events], dtype=object))
            import json

            ds[S.T_EVENT_PAYLOAD] = (
                S.T_EVENT_DIM,
                np.asarray([json.dumps(e["payload"]) for e in events], dtype=object),
            )
            self._telemetry = ds
        return self._telemetry


# ---------------------------------------------------------------- dask and xarray views
# ``xr.open_zarr`` and ``da.from_zarr`` read our arrays too (spec/FORMAT.md), but through
# zarr-python, which returns the fill value for a missing chunk and never looks at the
# per-chunk CRC manifest: damage would be read as zeros.  The views here build each dask
# chunk from exactly one stored chunk (a packed leaf: the whole leaf) with ``read_block``,
# which checks the size, the CRC32C trailer and the manifest, so a damaged checkpoint raises
# CheckpointCorruptError naming the leaf and chunk, even deep inside a dask reduction.  One
# dask chunk per stored chunk keeps reductions out of core.


def _dask_array_module():
    try:
        import dask.array as da
    except ImportError as e:
        raise MissingDependencyError(
            "lazy xarray/dask views need dask: pip install 'computable-flows-shim[analysis]'"
        ) from e
    return da


def _read_block(stored: Stored, coords: tuple[int, ...], crc: int, checkpoint: tuple[str, str]):
    """One dask chunk: one stored chunk, checked (a task; module level so that it pickles)."""
    with deleted_while_reading(*checkpoint):
        return stored.read_block(coords)


def _dask_from_stored(stored: Stored, name: str, checkpoint: tuple[str, str]) -> dask.array.Array:
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
    for kp, node, stored in view.leaves():
        if stored is None:
            value = scalar_value(node, view._where(kp))
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


def describe_leaves(view: CheckpointView, *, disk: bool = True) -> list[LeafInfo]:
    """Every leaf of ``view``'s state in tree order, from metadata only (no chunk is read).

    ``disk=False`` skips the ``stat`` of every chunk file (``disk_bytes`` is then 0).

    Example::

        >>> [(leaf.name, leaf.shape, leaf.chunk_shape) for leaf in describe_leaves(view)]
        [("state['x']", (4096,), (4096,)), ...]
    """
    return view.describe_leaves(disk=disk)


__all__ = [
    "CheckpointView",
    "LazyArray",
    "PackedLeaf",
    "Stored",
    "StoredArray",
    "LeafInfo",
    "describe_leaves",
    "checkpoint_disk_bytes",
    "deleted_while_reading",
    "lazy_array_to_dask",
    "state_dataset",
    "state_datatree",
]
