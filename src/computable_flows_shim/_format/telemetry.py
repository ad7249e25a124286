"""Telemetry history <-> columns, and the summary stored in the attrs.

A history is either a mapping of equal-length 1-D columns (``{"iter": [...],
"E": [...], ..., "events": [...]}``) or a list of per-sample dicts.  Events are
dicts with ``type``, ``iter`` and a JSON ``payload``.  On disk: one 1-D array
per column along the ``iter`` dimension, three event columns along ``event``
(spec/FORMAT.md, "Telemetry").
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim._format.dtypes import zarr_name
from computable_flows_shim._format.jsonattrs import to_json
from computable_flows_shim.errors import MetadataError

EVENT_KEYS = ("type", "iter", "payload")
_COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


class AppendOnlyHistory(dict):
    """A telemetry history (columns and ``"events"``, as :func:`normalize` takes) from a log
    that only ever appends: every history of the same ``log`` starts with the samples of the
    earlier ones, unchanged, and its column arrays are never written to again.  A save may
    then take the samples an earlier save of the same log wrote as written (linked, neither
    read nor copied), so that a checkpoint's telemetry costs what was appended since, not the
    whole history.  The flow's recorder makes these; a plain dict is compared instead."""

    def __init__(self, columns: Mapping[str, Any], log: object) -> None:
        super().__init__(columns)
        self.log = log
        self.handed_out = {k: v for k, v in columns.items() if k != "events"}
        """The column arrays the log handed out: a column replaced in the dict since is not the log's."""

    def logged(self, name: str) -> bool:
        """Whether column ``name`` is still the array the log handed out."""
        return name in self.handed_out and self.get(name) is self.handed_out[name]

    @property
    def samples(self) -> int:
        return min((len(v) for v in self.handed_out.values()), default=0)

    @property
    def intact(self) -> bool:
        """Every column is the one the log handed out, and no other was added."""
        return set(self) - {"events"} == set(self.handed_out) and all(map(self.logged, self.handed_out))


@dataclass(frozen=True)
class LogMark:
    """What a save wrote from an :class:`AppendOnlyHistory`: into checkpoint ``checkpoint``,
    the first ``samples`` samples of ``log``, summarized as ``summary``."""

    checkpoint: str
    log: object
    samples: int
    summary: dict

    @classmethod
    def of(cls, history: Any, checkpoint: str, summary: dict) -> LogMark | None:
        if not isinstance(history, AppendOnlyHistory) or not history.intact:
            return None
        return cls(checkpoint, history.log, int(summary.get("samples", 0)), summary)

    def continued_by(self, history: Any) -> bool:
        """Whether ``history`` continues the log this mark saved from (an earlier snapshot of
        it, with fewer samples, does not)."""
        if not isinstance(history, AppendOnlyHistory) or history.log is not self.log or not history.intact:
            return False
        return history.samples >= self.samples


def _column(name: str, values: Any, start: int = 0) -> np.ndarray:
    """``values`` as a 1-D column; only samples from ``start`` on are checked (those before
    were checked when an earlier save of the same append-only log took them)."""
    a = np.asarray(values)
    if a.ndim != 1:
        raise MetadataError(f"telemetry column {name!r}: expected 1-D values, got shape {a.shape}")
    if a.dtype.kind == "U":
        # numpy turns ["a", 1] into text ["a", "1"]: refuse rather than change a value's type
        if not isinstance(values, np.ndarray) and set(map(type, values)) - {str, np.str_}:
            raise MetadataError(f"telemetry column {name!r}: mixes text with other values")
        return a.astype(object)
    if a.dtype.kind == "O":
        if set(map(type, a[start:].tolist())) - {str}:  # map/set run in C: ~20 ms per million samples
            raise MetadataError(f"telemetry column {name!r}: mixes text with other values")
        return a
    if zarr_name(a.dtype) is None:
        raise MetadataError(f"telemetry column {name!r}: unsupported dtype {a.dtype}")
    return a if a.dtype.byteorder != ">" else a.astype(a.dtype.newbyteorder("<"))


def normalize(history: Any, prior: LogMark | None = None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Columns (name -> 1-D array, all one length) and events of a history.  ``prior``: the
    mark of an earlier save of the same append-only log, whose samples are not checked again."""
    if history is None:
        return {}, []
    events: list = []
    if isinstance(history, Mapping):
        raw = dict(history)
        events = list(raw.pop("events", None) or [])
        start = prior.samples if prior is not None else 0
        cols = {str(k): _column(str(k), v, start) for k, v in raw.items()}
    elif isinstance(history, (list, tuple)):
        names: dict[str, None] = {}
        for i, row in enumerate(history):
            if not isinstance(row, Mapping):
                raise MetadataError(f"telemetry sample {i}: expected a dict, got {type(row).__name__}")
            names.update(dict.fromkeys(map(str, row)))
        missing = [(i, n) for i, row in enumerate(history) for n in names if n not in row]
        if missing:
            i, n = missing[0]
            raise MetadataError(f"telemetry sample {i}: has no {n!r} (every sample needs the same keys)")
        cols = {n: _column(n, [row[n] for row in history]) for n in names}
    else:
        raise MetadataError(
            f"telemetry_history: expected a dict of columns or a list of dicts, got {type(history).__name__}"
        )
    lengths = {n: len(a) for n, a in cols.items()}
    if len(set(lengths.values())) > 1:
        raise MetadataError(f"telemetry columns have different lengths: {lengths}")
    for n in cols:
        if not _COLUMN_RE.match(n) or n.startswith(S.T_EVENT_DIM) or n.lower() == "zarr.json" or n.startswith("__"):
            raise MetadataError(
                f"telemetry column name {n!r}: expected 1-64 characters from A-Z a-z 0-9 '_' '.' '-', starting with a "
                f"letter or '_', not starting with {S.T_EVENT_DIM!r} or '__' (names are also xarray variable names)"
            )
    folded = Counter(n.lower() for n in cols)
    if len(folded) != len(cols):
        raise MetadataError(
            f"telemetry column names equal up to case: {sorted(n for n in cols if folded[n.lower()] > 1)}"
        )
    if S.T_SAMPLE_DIM in cols and cols[S.T_SAMPLE_DIM].dtype.kind not in "iu":
        raise MetadataError(f"telemetry column {S.T_SAMPLE_DIM!r} must hold integers, got {cols[S.T_SAMPLE_DIM].dtype}")
    norm_events = []
    for i, ev in enumerate(events):
        if not isinstance(ev, Mapping) or not isinstance(ev.get("type"), str):
            raise MetadataError(f"telemetry event {i}: expected a dict with a str 'type', got {ev!r}")
        extra = {k: v for k, v in ev.items() if k not in EVENT_KEYS}
        payload = dict(ev.get("payload") or {}, **extra)
        it = ev.get("iter", -1)
        norm_events.append({"type": ev["type"], "iter": int(it), "payload": to_json(payload, f"event {i} payload")})
    return cols, norm_events


def event_columns(events: list[dict]) -> dict[str, np.ndarray]:
    return {
        S.T_EVENT_ITER: np.asarray([e["iter"] for e in events], dtype=np.int64),
        S.T_EVENT_TYPE: np.asarray([e["type"] for e in events], dtype=object),
        S.T_EVENT_PAYLOAD: np.asarray([json.dumps(e["payload"], allow_nan=False) for e in events], dtype=object),
    }


def events_from_columns(cols: dict[str, np.ndarray]) -> list[dict]:
    its, types, payloads = cols[S.T_EVENT_ITER], cols[S.T_EVENT_TYPE], cols[S.T_EVENT_PAYLOAD]
    return [{"type": str(t), "iter": int(i), "payload": json.loads(p)} for i, t, p in zip(its, types, payloads)]


def _finite(x: Any) -> Any:
    return to_json(float(x), "telemetry_summary")  # non-finite as "NaN"/"Infinity", like all attrs


def summarize(cols: dict[str, np.ndarray], events: list[dict], iteration: int, prior: LogMark | None = None) -> dict:
    """The ``telemetry_summary`` attribute: what listing shows without reading arrays.
    ``prior``: the mark of an earlier save of the same append-only log; the energy range and
    phases of its samples are taken from its summary, not computed again."""
    n = len(next(iter(cols.values()))) if cols else 0
    s: dict[str, Any] = {"total_iterations": iteration, "samples": n, "events": len(events)}
    old: dict = {}
    start = 0  # samples summarized in ``old``
    if prior is not None and prior.samples <= n:
        old, start = prior.summary, prior.samples
    it = cols.get(S.T_SAMPLE_DIM)
    if it is not None and n:
        s["first_iter"], s["last_iter"] = int(it[0]), int(it[-1])
    for name, key in (("E", "energy"), ("grad_norm", "grad_norm")):
        c = cols.get(name)
        if c is not None and n and c.dtype.kind in "iuf":
            s[f"final_{key}"] = _finite(c[-1])
            if name == "E":
                known = start if "energy_min" in old else 0
                new = c[known:][np.isfinite(c[known:])]
                lows = [v for v in (old.get("energy_min") if known else None,) if v is not None]
                highs = [v for v in (old.get("energy_max") if known else None,) if v is not None]
                if new.size:
                    lows.append(float(new.min()))
                    highs.append(float(new.max()))
                s["energy_min"] = min(lows) if lows else None
                s["energy_max"] = max(highs) if highs else None
    ph = cols.get("phase")
    if ph is not None:
        known = start if "phase_counts" in old else 0
        counts: Counter = Counter(old["phase_counts"] if known else {})
        counts.update(ph[known:].tolist())
        s["phase_counts"] = {str(k): v for k, v in counts.items()}
    return s
