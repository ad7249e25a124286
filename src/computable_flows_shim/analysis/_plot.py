"""Telemetry curves with matplotlib: energy, gradient norm and phase over iterations,
one line per run (``cfs plot RUN... -o energy.png``).

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


__all__ = ["plot_telemetry", "PHASE_COLORS"]
