"""Telemetry while a flow runs: columnar buffers (numpy arrays that double in
capacity, never a list of dicts growing per iteration) plus a sparse events log.
``history()`` gives the form ``create_checkpoint(telemetry_history=...)`` stores."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from computable_flows_shim._format.telemetry import AppendOnlyHistory

COLUMNS: dict[str, Any] = {
    "iter": np.int64,
    "t_wall_ms": np.float64,
    "E": np.float64,
    "grad_norm": np.float64,
    "alpha": np.float64,
    "phase": object,
    "sparsity_wx": np.float64,
    "eta_dd": np.float64,
    "gamma": np.float64,
}
EVENT_TYPES = (
    "RUN_STARTED",
    "CHECKPOINT_CREATED",
    "FLOW_RESUMED",
    "ROLLBACK",
    "DIVERGED",
    "RUN_INTERRUPTED",
    "RUN_FINISHED",
)


class TelemetryRecorder:
    """Per-iteration samples (every ``every``-th iteration) and events of one run."""

    def __init__(self, every: int = 1, capacity: int = 1024) -> None:
        if every < 1:
            raise ValueError(f"telemetry sampling interval must be >= 1, got {every}")
        self.every = every
        self._n = 0
        self._cols = {k: np.empty(capacity, dtype=dt) for k, dt in COLUMNS.items()}
        self.events: list[dict] = []
        self._t0 = time.perf_counter()
        self._wall_offset = 0.0
        self._log = object()  # this recorder's log, as saves know it (AppendOnlyHistory)

    def __len__(self) -> int:
        return self._n

    def wants(self, iteration: int) -> bool:
        return iteration % self.every == 0

    def record(self, iteration: int, **values: Any) -> None:
        if self._n == len(self._cols["iter"]):
            for k, a in self._cols.items():
                grown = np.empty(2 * len(a), dtype=a.dtype)
                grown[: self._n] = a
                self._cols[k] = grown
        row = {"iter": iteration, "t_wall_ms": self.wall_ms(), **values}
        for k, a in self._cols.items():
            a[self._n] = row[k]
        self._n += 1

    def wall_ms(self) -> float:
        """Milliseconds since the run started, continuing across resumes."""
        return self._wall_offset + (time.perf_counter() - self._t0) * 1e3

    def event(self, type_: str, iteration: int, **payload: Any) -> None:
        self.events.append({"type": type_, "iter": int(iteration), "payload": {"t_wall_ms": self.wall_ms(), **payload}})

    def history(self) -> AppendOnlyHistory:
        """The samples so far (read-only views: a sample, once recorded, is never written
        again, and growing moves the buffers) and events: an append-only log, so a save
        writes only what was appended since this recorder's previous save."""
        cols: dict[str, Any] = {}
        for k, a in self._cols.items():
            view = a[: self._n]
            view.flags.writeable = False
            cols[k] = view
        cols["events"] = list(self.events)
        return AppendOnlyHistory(cols, self._log)

    @classmethod
    def from_history(cls, history: dict, every: int) -> TelemetryRecorder:
        """Continue a history loaded from a checkpoint (no gap, no duplicate)."""
        n = len(history.get("iter", []))
        rec = cls(every, capacity=max(1024, 2 * n))
        for k in COLUMNS:
            if k in history:
                rec._cols[k][:n] = history[k]
        rec._n = n
        rec.events = list(history.get("events", []))
        if n:
            rec._wall_offset = float(history["t_wall_ms"][-1])
        return rec
