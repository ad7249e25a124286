"""Lazy views: a checkpoint's attributes without reading arrays, its leaves as
:class:`LazyArray` whose slicing reads (and checks) only the chunks it touches,
and its telemetry as an ``xarray.Dataset``."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np

from . import _codec
from . import _spec as S
from ._tree import keystr, scalar_value, unflatten
from ._types import PyTree
from .errors import CheckpointCorruptError, CheckpointNotFoundError


@contextmanager
def deleted_while_reading(path: str, checkpoint_id: str) -> Iterator[None]:
    """Report a checkpoint deleted under a reader as not found, not as damage.

    A delete renames the whole checkpoint directory away (spec/FORMAT.md, "Delete"), so
    a reader that opens a file afterwards finds it missing, which on its own reads as a
    corrupt checkpoint.  When the checkpoint directory itself is gone, that is what
    happened (a cleanup ran, issue 8), and the reader gets CheckpointNotFoundError.
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

    def __init__(self, stored: _codec.StoredArray, name: str, checkpoint: tuple[str, str] | None = None) -> None:
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
        from ._xarray import lazy_array_to_dask

        return lazy_array_to_dask(self)

    def __getitem__(self, key: Any) -> np.ndarray:
        with deleted_while_reading(*self._checkpoint) if self._checkpoint else nullcontext():
            out, n = _codec.read_region(self._s, key, self.name)
        self.chunks_read += n
        return out


class CheckpointView:
    """A committed checkpoint opened lazily (see ``CheckpointManager.open_checkpoint``)."""

    def __init__(self, path: str, attrs: dict) -> None:
        self.path = path
        self.attrs = attrs
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
        from ._repr import view_text

        try:  # leaves, layout, telemetry summary, lineage (metadata only); never fail a repr
            return view_text(self)
        except Exception:  # noqa: BLE001 - e.g. deleted meanwhile: the short form still helps
            return f"<CheckpointView {self.checkpoint_id} run={self.run_id} iteration={self.iteration}>"

    def _repr_html_(self) -> str:
        """The notebook display: leaves with shape/dtype/chunks/size, attrs, telemetry summary, lineage."""
        from ._repr import view_html

        return view_html(self)

    def to_xarray(self, dims: dict | None = None):
        """The state as a dask-backed ``xarray.Dataset`` (see :func:`computable_flows_shim.state_dataset`)."""
        from ._xarray import state_dataset

        return state_dataset(self, dims)

    def to_datatree(self):
        """The state as a dask-backed ``xarray.DataTree`` (see :func:`computable_flows_shim.state_datatree`)."""
        from ._xarray import state_datatree

        return state_datatree(self)

    @property
    def state(self) -> PyTree:
        """The state tree with :class:`LazyArray` leaves (metadata read now, bytes on slicing)."""
        if self._state is None:
            state_dir = os.path.join(self.path, S.STATE_GROUP)
            checkpoint = (self.path, self.checkpoint_id)

            def leaf(kp: tuple, node: dict) -> Any:
                where = f"checkpoint {self.checkpoint_id!r}, leaf {keystr(kp)}"
                if node["kind"] == "scalar":
                    return scalar_value(node, where)
                return LazyArray(_codec.open_array(state_dir, node["path"], where), keystr(kp), checkpoint)

            with deleted_while_reading(*checkpoint):
                self._state = unflatten(self.attrs[S.A_TREE], leaf)
        return self._state

    @property
    def telemetry(self):
        """The telemetry as an ``xarray.Dataset`` (columns along ``iter``, events along ``event``)."""
        if self._telemetry is None:
            import xarray as xr

            with deleted_while_reading(self.path, self.checkpoint_id):
                cols = _codec.read_telemetry(self.path, self.checkpoint_id)
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
