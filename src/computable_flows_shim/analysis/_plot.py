"""Plots with matplotlib: telemetry curves (energy, gradient norm and phase over iterations,
one line per run: ``cfs plot RUN... -o energy.png``) and a run's states (a grid of a 2-D
leaf at chosen checkpoints, and convergence curves: ``cfs plot RUN --state x -o grid.png``).

It draws on a ``matplotlib.figure.Figure`` of its own, never through ``pyplot``: no global
figure state, no GUI backend, the same result in a script, a notebook or a CI job
(``savefig`` renders with Agg).  The figure shows itself in a notebook (``_repr_png_``).
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim.analysis._convergence import distance_to, successive_change, telemetry_at_checkpoints
from computable_flows_shim.analysis._states import CHECKPOINT_COORD, ITERATION_DIM, RUN_DIM, open_run_states
from computable_flows_shim.analysis._xarray import RUN_COORD, open_telemetry
from computable_flows_shim.checkpoints._lineage import list_runs
from computable_flows_shim.errors import MissingDependencyError

if TYPE_CHECKING:
    import xarray
    from matplotlib.figure import Figure

    from computable_flows_shim.checkpoints._manager import CheckpointManager

PHASE_COLORS = {"GREEN": "#2ca02c", "AMBER": "#ff9f0e", "RED": "#d62728"}
DEFAULT_COLUMNS = ("E", "grad_norm", "phase")
_LABELS = {"E": "energy E", "grad_norm": "gradient norm", "phase": "phase", "alpha": "step alpha"}


@functools.cache
def _figure_class() -> type:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise MissingDependencyError("plots need matplotlib: pip install 'computable-flows-shim[analysis]'") from e

    class TelemetryFigure(Figure):
        """A Figure that displays itself in a notebook without pyplot (IPython's ``_repr_png_``)."""

        def _repr_png_(self) -> bytes:
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=100)
            return buf.getvalue()

    return TelemetryFigure


def _figure(width: float, height: float) -> Figure:
    return _figure_class()(figsize=(width, height), layout="constrained")


def _segments(values: np.ndarray) -> list[tuple[int, int, str]]:
    """Runs of equal values: ``(start index, stop index, value)``."""
    out: list[tuple[int, int, str]] = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((start, i, str(values[start])))
            start = i
    return out


def _by_run(ds: xarray.Dataset) -> list[tuple[str, xarray.Dataset]]:
    if RUN_COORD not in ds.coords:
        return [("", ds)]
    runs = np.asarray(ds[RUN_COORD].values)
    order = list(dict.fromkeys(runs.tolist()))
    return [(str(r), ds.isel({S.T_SAMPLE_DIM: np.flatnonzero(runs == r)})) for r in order]


def plot_telemetry(
    source: CheckpointManager | xarray.Dataset,
    runs: str | Iterable[str] | None = None,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    *,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    log: bool | None = None,
) -> Figure:
    """Plot telemetry columns over iterations, one panel per column, one line per run.

    ``source`` is a :class:`CheckpointManager` (``runs``: run or checkpoint ids, default
    every run; read with :func:`open_telemetry`, which also marks where branches were
    rolled back) or a Dataset from :func:`open_telemetry`.  Text columns such as ``phase``
    are drawn as colored bands (GREEN / AMBER / RED), one row per run.  Numeric panels use
    a log scale when all values are positive and span more than two decades (``log``
    forces it on or off).  With ``path``, the figure is also saved there (PNG, SVG, PDF
    by suffix).  Returns the ``matplotlib.figure.Figure``.

    Example::

        >>> fig = plot_telemetry(mgr, ["exp1", "exp1-branch"], path="energy.png")
    """
    import xarray as xr

    branches: dict[str, int] = {}
    if isinstance(source, xr.Dataset):
        ds = source
    else:
        ds = open_telemetry(source, runs)
        wanted = set(ds.attrs.get("runs", []))
        branches = {
            r.run_id: r.branch_iteration
            for r in list_runs(source)
            if r.run_id in wanted and r.branch_iteration is not None
        }
    missing = [c for c in columns if c not in ds.data_vars]
    if missing:
        raise ValueError(f"no telemetry column(s) {missing}; the columns are {sorted(map(str, ds.data_vars))}")
    parts = _by_run(ds)
    text = [ds[c].dtype == object or ds[c].dtype.kind in "US" for c in columns]
    # a band per run for text columns, so their panels grow with the number of runs
    ratios = [min(1.0, 0.25 + 0.15 * len(parts)) if t else 1.0 for t in text]
    fig = _figure(8.0, 0.4 + 2.4 * sum(ratios))
    axes = fig.subplots(len(columns), 1, sharex=True, squeeze=False, height_ratios=ratios)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(parts))]
    legend_done = False
    for ax, col, is_text in zip(axes, columns, text):
        if is_text:
            _phase_panel(ax, parts, col, branches)
        else:
            _numeric_panel(ax, parts, col, colors, branches, log)
            if not legend_done and any(name for name, _ in parts):
                ax.legend(loc="best", fontsize="small")
                legend_done = True
        ax.set_ylabel(_LABELS.get(col, col))
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=100)
    return fig


def _numeric_panel(ax: Any, parts, col: str, colors: list[str], branches: dict[str, int], log: bool | None) -> None:
    finite_pos, finite = [], []
    for (name, part), color in zip(parts, colors):
        it = _iters(part)
        y = np.asarray(part[col].values, dtype=np.float64)
        b = branches.get(name)
        if b is None:
            ax.plot(it, y, color=color, label=name or None, linewidth=1.2)
        else:  # what the branch inherited from its parent, faint; its own iterations, solid
            own = it >= b
            ax.plot(it[~own | (it == b)], y[~own | (it == b)], color=color, linewidth=1.0, alpha=0.35)
            ax.plot(it[own], y[own], color=color, label=name or None, linewidth=1.2)
        ok = np.isfinite(y)
        finite.append(y[ok])
        finite_pos.append(bool(np.all(y[ok] > 0)))
        if b is not None and ok.any():
            at = np.flatnonzero(it == b)
            if at.size and ok[at[0]]:
                ax.plot([b], [y[at[0]]], marker="o", color=color, markersize=5, linestyle="none")
    values = np.concatenate(finite) if finite else np.empty(0)
    if log is None:
        log = bool(values.size) and all(finite_pos) and values.min() > 0 and values.max() / values.min() > 100
    if log and values.size and values.min() > 0:
        ax.set_yscale("log")


def _iters(part: xarray.Dataset) -> np.ndarray:
    if S.T_SAMPLE_DIM in part.coords:
        return np.asarray(part[S.T_SAMPLE_DIM].values)
    return np.arange(part.sizes[S.T_SAMPLE_DIM])


def _phase_panel(ax: Any, parts, col: str, branches: dict[str, int]) -> None:
    names = []
    seen: dict[str, bool] = {}
    for row, (name, part) in enumerate(parts):
        it = _iters(part)
        vals = np.asarray(part[col].values, dtype=object)
        step = float(np.median(np.diff(it))) if len(it) > 1 else 1.0
        b = branches.get(name)
        for lo, hi, v in _segments(vals):
            if isinstance(vals[lo], float) and math.isnan(vals[lo]):
                continue  # a run without this column (open_telemetry fills NaN)
            color = PHASE_COLORS.get(v, "#7f7f7f")
            x0, x1 = float(it[lo]) - step / 2, float(it[hi - 1]) + step / 2
            pieces = [(x0, x1, 1.0)]
            if b is not None:  # a branch: what it inherited from its parent, faint
                pieces = [(x0, min(x1, b), 0.35), (max(x0, b), x1, 1.0)]
            for p0, p1, alpha in pieces:
                if p1 > p0:
                    label = None if v in seen else v
                    ax.broken_barh([(p0, p1 - p0)], (row - 0.4, 0.8), facecolors=color, alpha=alpha, label=label)
                    seen[v] = True
        names.append(name or col)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.4, -0.6)  # the first run on top, as in the legend of the curves
    if seen:  # beside the bands, never over them
        ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small", frameon=False)


def _evenly_spaced(iterations: np.ndarray, count: int) -> list[int]:
    """``count`` checkpoint iterations evenly spaced along the axis, first and last included."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    picks = np.unique(np.round(np.linspace(0, len(iterations) - 1, min(count, len(iterations)))).astype(int))
    return [int(iterations[i]) for i in picks]


def _curves(ax: Any, its: np.ndarray, rows: list[tuple[str, np.ndarray]], label: str, marks: list[int]) -> None:
    """One line per run over the checkpoint iterations (holes skipped), log scale when the
    positive values span more than two decades (zeros, e.g. the reference itself, left out)."""
    positive = []
    for n, (name, y) in enumerate(rows):
        y = np.asarray(y, dtype=np.float64)
        ok = np.isfinite(y)
        ax.plot(its[ok], y[ok], marker=".", markersize=3, linewidth=1.2, color=f"C{n % 10}", label=name or None)
        positive.append(y[ok & (y > 0)])
    pos = np.concatenate(positive) if positive else np.empty(0)
    if pos.size and pos.max() / pos.min() > 100:
        ax.set_yscale("log")
    for it in marks:
        ax.axvline(it, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_ylabel(label)
    ax.grid(True, alpha=0.3)


def plot_states(
    source: CheckpointManager | xarray.Dataset,
    runs: str | Iterable[str] | None = None,
    leaf: str | None = None,
    *,
    iterations: Sequence[int] | None = None,
    count: int = 6,
    reference: Any = "last",
    norm: str = "l2",
    columns: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
    cmap: str = "viridis",
) -> Figure:
    """A run's states over its checkpoints: for a 2-D leaf, a grid of images at chosen
    checkpoints (one row per run; ``iterations``, default ``count`` evenly spaced, first and
    last included), and for any leaf the convergence curves: :func:`distance_to`
    ``reference`` (default each run's last checkpoint), :func:`successive_change`, and
    telemetry columns at the checkpoint iterations (``columns``, default ``E`` when the runs
    have it).  Dotted lines mark the iterations of the grid.

    ``source`` is a :class:`CheckpointManager` (``runs``: a run id or several, default every
    run; opened with :func:`open_run_states`) or a Dataset from :func:`open_run_states`
    (then no telemetry: it needs the store).  ``leaf``: a stored path (``"x"``), needed when
    the Dataset has several.  Everything is computed in one dask pass, each distinct chunk
    read (and checked) once.  With ``path``, the figure is also saved there (PNG, SVG, PDF
    by suffix).  Returns the ``matplotlib.figure.Figure``.

    Example::

        >>> fig = plot_states(mgr, "exp1", "x", path="grid.png")           # cfs plot exp1 --state x -o grid.png
        >>> fig = plot_states(mgr, ["exp1", "exp1-branch"], "x", iterations=[100, 1000, 8000])
    """
    import dask
    import xarray as xr

    mgr = None
    if isinstance(source, xr.Dataset):
        ds = source
    else:
        mgr = source
        if runs is None:
            runs = [r.run_id for r in list_runs(source)]
        ds = open_run_states(source, runs, None if leaf is None else [leaf])
    if leaf is None:
        if len(ds.data_vars) != 1:
            raise ValueError(f"which leaf? the leaves are {sorted(map(str, ds.data_vars))}")
        leaf = str(next(iter(ds.data_vars)))
    if leaf not in ds.data_vars:
        raise ValueError(f"no leaf {leaf!r}; the leaves are {sorted(map(str, ds.data_vars))}")
    x = ds[leaf]
    multi = RUN_DIM in x.dims
    names = [str(r) for r in x[RUN_DIM].values] if multi else ["".join(ds.attrs.get("runs", [""])[:1])]
    its = np.asarray(x[ITERATION_DIM].values)
    present = np.asarray(x[CHECKPOINT_COORD].values) != "" if CHECKPOINT_COORD in x.coords else None
    grid = x.ndim - (2 if multi else 1) == 2
    if iterations is None:
        chosen = _evenly_spaced(its, count)
    else:
        chosen = [int(i) for i in iterations]
        unknown = sorted(set(chosen) - set(its.tolist()))
        if unknown:
            raise ValueError(f"no checkpoint at iteration(s) {unknown}; the iterations are {its.tolist()}")
    tel = None
    if mgr is not None:
        cols = ["E"] if columns is None else list(columns)
        tel = telemetry_at_checkpoints(mgr, ds, None if columns is None else cols)
        cols = [c for c in cols if c in tel.data_vars and tel[c].dtype.kind in "fiu"]
        if columns is not None and len(cols) != len(columns):
            raise ValueError(f"telemetry column(s) {sorted(set(columns) - set(cols))} are not numeric")
        tel = tel[cols]
    lazy = [distance_to(x, reference, norm=norm), successive_change(x, norm=norm)]
    if grid:
        lazy.append(x.sel({ITERATION_DIM: chosen}))
    done = dask.compute(*lazy)  # one pass: chunks shared by the curves and the images are read once
    dist, change = done[0], done[1]

    n_curves = 2 + (len(tel.data_vars) if tel is not None else 0)
    img_rows = len(names) if grid else 0
    ncols = len(chosen) if grid else 1
    fig = _figure(max(8.0, 1.7 * ncols + 1.0), 0.6 + 1.8 * img_rows + 2.0 * n_curves)
    gs = fig.add_gridspec(img_rows + n_curves, ncols)
    if grid:
        images = done[2]
        values = np.asarray(images.values)
        if np.iscomplexobj(values):
            values = np.abs(values)
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        img_axes, im = [], None
        for r, name in enumerate(names):
            for c, it in enumerate(chosen):
                ax = fig.add_subplot(gs[r, c])
                img = values[r, c] if multi else values[c]
                has = present is None or bool((present[r] if multi else present)[list(its).index(it)])
                if has:
                    im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
                else:
                    ax.text(0.5, 0.5, "no checkpoint", ha="center", va="center", transform=ax.transAxes)
                    ax.set_box_aspect(img.shape[0] / max(img.shape[1], 1))  # the size of the images beside it
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"iteration {it}", fontsize="small")
                if c == 0 and name:
                    ax.set_ylabel(name, fontsize="small")
                img_axes.append(ax)
        if im is not None:
            fig.colorbar(im, ax=img_axes, shrink=0.9, label=leaf)
    marks = chosen if grid else []

    def rows_of(a: xarray.DataArray) -> list[tuple[str, np.ndarray]]:
        return [(n, a.values[i] if multi else a.values) for i, n in enumerate(names)]

    first = fig.add_subplot(gs[img_rows, :])
    _curves(first, its, rows_of(dist), dist.attrs["long_name"].replace(" to ", " to\n", 1), marks)
    if multi:
        first.legend(loc="best", fontsize="small")
    panels = [first]
    ax = fig.add_subplot(gs[img_rows + 1, :], sharex=first)
    _curves(ax, its, rows_of(change), f"{norm} change from the\nprevious checkpoint", marks)
    panels.append(ax)
    for k, col in enumerate(tel.data_vars if tel is not None else []):
        assert tel is not None
        ax = fig.add_subplot(gs[img_rows + 2 + k, :], sharex=first)
        _curves(ax, its, rows_of(tel[col]), _LABELS.get(str(col), str(col)) + " (telemetry)", marks)
        panels.append(ax)
    panels[-1].set_xlabel("iteration")
    shown = ", ".join(n for n in names if n)
    fig.suptitle(title or (f"{leaf}: {shown}" if shown else leaf))
    if path is not None:
        fig.savefig(os.fspath(path), dpi=100)
    return fig


__all__ = ["plot_telemetry", "plot_states", "PHASE_COLORS"]
