"""How a run converges, on the Dataset of :func:`open_run_states`: the distance of each
checkpoint to a reference (:func:`distance_to`), the change between successive checkpoints
(:func:`successive_change`), and the telemetry at the checkpoint iterations
(:func:`telemetry_at_checkpoints`), on the same ``(run,) iteration`` axes.

Plain functions of xarray objects, lazy: the distances are dask reductions over the leaf's
stored chunks, each distinct chunk read once per computation (see ``_states.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim.analysis._states import CHECKPOINT_COORD, ITERATION_DIM, RUN_DIM

if TYPE_CHECKING:
    import xarray

    from computable_flows_shim.checkpoints._manager import CheckpointManager

NORMS = ("l2", "l1", "linf", "rms")


def _present(obj: Any) -> np.ndarray | None:
    """Where a checkpoint exists, from the ``checkpoint`` coordinate (None without it)."""
    if CHECKPOINT_COORD not in obj.coords:
        return None
    return np.asarray(obj[CHECKPOINT_COORD].values) != ""


def _leaf_dims(x: xarray.DataArray) -> list[str]:
    return [str(d) for d in x.dims if d not in (RUN_DIM, ITERATION_DIM)]


def _as_float(x: xarray.DataArray) -> xarray.DataArray:
    if x.dtype.kind in "OUS":
        raise TypeError(f"{x.name!r} is not numeric ({x.dtype}); distances need numbers")
    if ITERATION_DIM not in x.dims:
        raise ValueError(f"{x.name!r} has no {ITERATION_DIM!r} dimension (use open_run_states)")
    return x.astype(np.complex128 if x.dtype.kind == "c" else np.float64)


def _norm(a: xarray.DataArray, dims: list[str], norm: str) -> xarray.DataArray:
    """``a`` holds absolute values; a NaN anywhere (a hole, a diverged state) gives NaN."""
    if norm == "l2":
        return (a * a).sum(dims, skipna=False) ** 0.5
    if norm == "l1":
        return a.sum(dims, skipna=False)
    if norm == "linf":
        return a.max(dims, skipna=False) if dims else a
    if norm == "rms":
        return (a * a).mean(dims, skipna=False) ** 0.5
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _which(x: xarray.DataArray, which: str) -> Any:
    """The iteration of each run's last (or first) checkpoint: an int, or a DataArray over ``run``."""
    import xarray as xr

    its = np.asarray(x[ITERATION_DIM].values)
    present = _present(x)
    if present is None:
        present = np.ones(x.shape[: 2 if RUN_DIM in x.dims else 1], dtype=bool)
    rows = present if present.ndim == 2 else present[None]
    picked = []
    for row in rows:
        idx = np.flatnonzero(row)
        if not idx.size:
            raise ValueError(f"a run has no checkpoint here, so no {which} one")
        picked.append(int(its[idx[-1] if which == "last" else idx[0]]))
    if present.ndim == 1:
        return picked[0]
    return xr.DataArray(np.asarray(picked), dims=RUN_DIM, coords={RUN_DIM: x[RUN_DIM].values})


def _reference(x: xarray.DataArray, reference: Any) -> tuple[xarray.DataArray, str]:
    import xarray as xr

    if isinstance(reference, str):
        if reference not in ("last", "first"):
            raise ValueError(f"reference must be 'last', 'first', an iteration or a state, got {reference!r}")
        at = _which(x, reference)
        return x.sel({ITERATION_DIM: at}).reset_coords(drop=True), f"the {reference} checkpoint"
    if isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        if int(reference) not in set(np.asarray(x[ITERATION_DIM].values).tolist()):
            raise KeyError(f"no checkpoint at iteration {int(reference)}")
        return x.sel({ITERATION_DIM: int(reference)}).reset_coords(drop=True), f"iteration {int(reference)}"
    if isinstance(reference, xr.DataArray) and set(reference.dims) <= {RUN_DIM} and reference.dtype.kind in "iu":
        return x.sel({ITERATION_DIM: reference}).reset_coords(drop=True), "each run's chosen iteration"
    leaf = _leaf_dims(x)
    ref = reference if isinstance(reference, xr.DataArray) else xr.DataArray(np.asarray(reference), dims=leaf)
    if not set(ref.dims) <= set(leaf) | {RUN_DIM}:
        raise ValueError(f"a reference state has the leaf's dims {leaf}, got {list(ref.dims)}")
    return _as_float(ref.expand_dims({ITERATION_DIM: 1})).isel({ITERATION_DIM: 0}), "a given state"


def distance_to(
    states: xarray.DataArray | xarray.Dataset,
    reference: Any = "last",
    *,
    norm: str = "l2",
    relative: bool = False,
) -> Any:
    """How far each checkpoint's state is from a reference, lazily (a dask-backed DataArray
    over ``(run,) iteration``; a Dataset gives a Dataset, one distance per numeric leaf).

    ``reference``: ``"last"`` (each run's last checkpoint, the default), ``"first"``, an
    iteration, a DataArray of iterations over ``run`` (e.g. each run's best, from
    ``telemetry_at_checkpoints(...)["E"].idxmin("iteration")``), or a state of the leaf's
    shape (a ground truth).  ``norm``: ``"l2"`` (Frobenius over the leaf's dims), ``"l1"``,
    ``"linf"`` (largest absolute difference) or ``"rms"``; computed in float64 (complex:
    the modulus).  ``relative`` divides by the reference's norm.  Holes and non-finite
    states give NaN.  Computing it reads each distinct chunk once (see :func:`open_run_states`).

    Example::

        >>> ds = open_run_states(mgr, "exp1", ["x"])
        >>> distance_to(ds["x"]).values          # array([12.3, 4.1, ..., 0.0])
        >>> distance_to(ds["x"], 1000, norm="linf", relative=True)
    """
    import xarray as xr

    if isinstance(states, xr.Dataset):
        out = {}
        for name, var in states.data_vars.items():
            if var.dtype != object and var.dtype.kind not in "US":
                ref = reference[name] if isinstance(reference, xr.Dataset) else reference
                out[name] = distance_to(var, ref, norm=norm, relative=relative)
        return xr.Dataset(out, attrs={"runs": states.attrs.get("runs")})
    x = _as_float(states)
    ref, what = _reference(x, reference)
    dims = _leaf_dims(x)
    coords = x.coords
    d = _norm(abs(x.reset_coords(drop=True) - ref), dims, norm)
    if relative:
        base = _norm(abs(ref), dims, norm)
        d = d / base.where(base > 0)  # NaN, not a warning, where the reference is zero
    d = d.assign_coords({c: coords[c] for c in coords if set(coords[c].dims) <= set(d.dims)})
    d.name = states.name
    d.attrs = {"long_name": f"{'relative ' if relative else ''}{norm} distance to {what}", "norm": norm}
    return d


def successive_change(
    states: xarray.DataArray | xarray.Dataset, *, norm: str = "l2", relative: bool = False
) -> Any:
    """How far each checkpoint moved from the run's previous one: ``‖x_k - x_{k-1}‖`` over
    ``(run,) iteration``, lazily (NaN at each run's first checkpoint and at holes; a Dataset
    gives a Dataset).  The coordinate ``previous_iteration`` says which checkpoint each
    was compared with (-1: none).  ``relative`` divides by ``‖x_k‖``.  Norms as in
    :func:`distance_to`; checkpoints need not be evenly spaced (divide by the iteration gap
    for a rate).

    Example::

        >>> successive_change(open_run_states(mgr, "exp1", ["x"])["x"]).values
    """
    import xarray as xr

    if isinstance(states, xr.Dataset):
        each = {
            n: successive_change(v, norm=norm, relative=relative)
            for n, v in states.data_vars.items()
            if v.dtype != object and v.dtype.kind not in "US"
        }
        return xr.Dataset(each, attrs={"runs": states.attrs.get("runs")})
    x = _as_float(states)
    dims = _leaf_dims(x)
    its = np.asarray(x[ITERATION_DIM].values)
    present = _present(x)
    multi = RUN_DIM in x.dims
    if present is None:
        present = np.ones((x.sizes[RUN_DIM], len(its)) if multi else len(its), dtype=bool)
    parts, prev_its = [], []
    for r in range(x.sizes[RUN_DIM]) if multi else [None]:
        row = present[r] if r is not None else present
        part = x.isel({RUN_DIM: r}) if r is not None else x
        idx = np.flatnonzero(row)
        y = part.isel({ITERATION_DIM: idx}).reset_coords(drop=True)
        cur = y.isel({ITERATION_DIM: slice(1, None)})
        prev = y.isel({ITERATION_DIM: slice(None, -1)}).assign_coords({ITERATION_DIM: cur[ITERATION_DIM].values})
        d = _norm(abs(cur - prev), dims, norm)
        if relative:
            base = _norm(abs(cur), dims, norm)
            d = d / base.where(base > 0)
        parts.append(d.reindex({ITERATION_DIM: its}))
        p = np.full(len(its), -1, dtype=np.int64)
        p[idx[1:]] = its[idx[:-1]]
        prev_its.append(p)
    if multi:
        out = xr.concat(parts, dim=RUN_DIM).assign_coords({RUN_DIM: x[RUN_DIM].values})
        out = out.assign_coords(previous_iteration=((RUN_DIM, ITERATION_DIM), np.stack(prev_its)))
    else:
        out = parts[0].assign_coords(previous_iteration=(ITERATION_DIM, prev_its[0]))
    if CHECKPOINT_COORD in x.coords:
        out = out.assign_coords({CHECKPOINT_COORD: x[CHECKPOINT_COORD]})
    out.name = states.name
    out.attrs = {"long_name": f"{'relative ' if relative else ''}{norm} change from the previous checkpoint"}
    return out


def telemetry_at_checkpoints(
    mgr: CheckpointManager, states: xarray.Dataset | xarray.DataArray, columns: Sequence[str] | None = None
) -> xarray.Dataset:
    """The telemetry sampled at the checkpoint iterations of ``states`` (from
    :func:`open_run_states`), on the same ``(run,) iteration`` axes: one variable per column
    (default every column), NaN where a run has no checkpoint or no sample at that iteration.

    Each run's last checkpoint holds its whole history (a branch's includes what it
    inherited), so one telemetry read per run; where a history has an iteration twice (a
    resumed run), its latest sample counts.  Read and checked now (telemetry is small).

    Example::

        >>> ds = open_run_states(mgr, "exp1", ["x"])
        >>> tel = telemetry_at_checkpoints(mgr, ds, ["E"])
        >>> best = tel["E"].idxmin("iteration"); distance_to(ds["x"], int(best))
    """
    import xarray as xr

    if CHECKPOINT_COORD not in states.coords:
        raise ValueError(f"telemetry_at_checkpoints needs the {CHECKPOINT_COORD!r} coordinate of open_run_states")
    ids = np.asarray(states[CHECKPOINT_COORD].values)
    its = np.asarray(states[ITERATION_DIM].values)
    multi = ids.ndim == 2
    parts = []
    for row in ids if multi else ids[None]:
        present = row != ""
        tel = mgr.open_checkpoint(str(row[np.flatnonzero(present)[-1]])).telemetry
        tel = tel.drop_vars([n for n in tel.data_vars if S.T_EVENT_DIM in tel[n].dims])
        if S.T_SAMPLE_DIM not in tel.coords:
            tel = xr.Dataset(coords={S.T_SAMPLE_DIM: np.empty(0, np.int64)})
        last = ~tel.indexes[S.T_SAMPLE_DIM].duplicated(keep="last")
        tel = tel.isel({S.T_SAMPLE_DIM: np.flatnonzero(last)})
        if columns is not None:
            absent = [c for c in columns if c not in tel.data_vars]
            if absent:
                raise ValueError(f"no telemetry column(s) {absent}; the columns are {sorted(map(str, tel.data_vars))}")
            tel = tel[list(columns)]
        tel = tel.reindex({S.T_SAMPLE_DIM: its}).rename({S.T_SAMPLE_DIM: ITERATION_DIM})
        mask = xr.DataArray(present, dims=ITERATION_DIM, coords={ITERATION_DIM: its})
        parts.append(tel.where(mask))
    if multi:
        out = xr.concat(parts, dim=RUN_DIM, join="outer", data_vars="all", coords="different", compat="equals")
        out = out.assign_coords({RUN_DIM: states[RUN_DIM].values})
    else:
        out = parts[0]
    out = out.assign_coords({CHECKPOINT_COORD: states[CHECKPOINT_COORD]})
    out.attrs = {"runs": states.attrs.get("runs")}
    return out


__all__ = ["distance_to", "successive_change", "telemetry_at_checkpoints", "NORMS"]
