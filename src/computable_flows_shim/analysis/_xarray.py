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

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim.errors import CheckpointNotFoundError

if TYPE_CHECKING:
    import xarray

    from computable_flows_shim.checkpoints._manager import CheckpointManager

RUN_COORD = "run"
"""Coordinate along ``iter`` naming the run of each telemetry sample (``open_telemetry``)."""
EVENT_RUN_COORD = "event_run"
"""Coordinate along ``event`` naming the run of each event (``open_telemetry``)."""


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


__all__ = ["open_telemetry", "RUN_COORD", "EVENT_RUN_COORD"]
