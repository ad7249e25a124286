"""Scenario 8 (issue 5): bad input to a save is refused, clearly, before anything is written.

Non-array leaves (objects, functions, sets, bytes, cycles), unsupported dtypes (object,
strings, datetimes, structured, long double), invalid run ids and iterations, configs
and metadata that are not JSON, malformed telemetry: each raises the library's error
(which also is the builtin TypeError/ValueError callers catch) naming what is wrong, with
``blocking`` True and False, and the store directory is byte-for-byte as it was (no
staging directory, no lock file, nothing).
"""

from __future__ import annotations

import datetime
import os

import numpy as np
import pytest

from computable_flows_shim import (
    CheckpointManager,
    ComputableFlowsError,
    InvalidIterationError,
    InvalidRunIdError,
    InvalidTagError,
    MetadataError,
    UnsupportedLeafError,
)

from .conftest import add


class Opaque:
    pass


def _cycle():
    a: list = []
    a.append(a)
    return a


def _deep(n):
    d: dict = {}
    for _ in range(n):
        d = {"k": d}
    return d


LEAVES = {
    "object": object(),
    "instance": Opaque(),
    "function": lambda x: x,
    "builtin": len,
    "set": {1, 2},
    "bytes": b"raw",
    "bytearray": bytearray(b"raw"),
    "generator": (i for i in range(3)),
    "object array": np.array([object(), 1], dtype=object),
    "unicode array": np.array(["a", "b"]),
    "bytes array": np.array([b"a"]),
    "datetime64": np.array(["2020-01-01"], dtype="datetime64[ns]"),
    "timedelta64": np.timedelta64(5, "s"),
    "structured": np.zeros(3, dtype=[("a", "i4"), ("b", "f8")]),
    "void": np.void(b"abc"),
    "longdouble": np.zeros(2, dtype=np.longdouble),
    "cycle": _cycle(),
    "tuple key": {(1, 2): np.ones(2)},
    "float key": {1.5: np.ones(2)},
    "bool key": {True: np.ones(2)},
    "None key": {None: np.ones(2)},
    "deeper than 100": _deep(120),
}
RUN_IDS = [
    "",
    ".",
    "..",
    "a/b",
    "a\\b",
    " a",
    "a b",
    "a\x00b",
    "a\nb",
    "-a",
    "_a",
    ".hidden",
    "é",
    "a" * 129,
    5,
    None,
    b"r",
]
ITERATIONS = [-1, 1.5, True, "3", None, np.int64(-1), float("nan"), 1j]
CONFIGS = {
    "object value": {"a": object()},
    "set value": {"a": {1, 2}},
    "int key": {1: "x"},
    "bytes value": {"a": b"x"},
    "array value": {"a": np.array([1, 2])},
    "datetime value": {"a": datetime.datetime(2020, 1, 1)},
    "deeper than 64": _deep(70),
    "not a dict": [1, 2],
    "function": {"f": print},
}
HISTORIES = {
    "unequal lengths": {"iter": [0, 1], "E": [1.0]},
    "2-D column": {"E": np.ones((2, 2))},
    "mixed text": {"phase": ["a", 1]},
    "bad column name": {"../x": [1]},
    "column named like events": {"event_x": [1]},
    "zarr.json column": {"zarr.json": [1]},
    "columns equal up to case": {"E": [1], "e": [2]},
    "float iter": {"iter": [0.5]},
    "object column": {"x": [object()]},
    "event not a dict": {"events": ["CHECKPOINT"]},
    "event without type": {"events": [{"iter": 1}]},
    "event payload not JSON": {"events": [{"type": "X", "payload": {"f": object()}}]},
    "not a history": 42,
    "row not a dict": [{"a": 1}, 3],
    "rows with different keys": [{"a": 1}, {"b": 2}],
}


def snapshot(store: str) -> list[tuple[str, int]]:
    out = []
    for base, dirs, files in os.walk(store):
        for n in dirs + files:
            p = os.path.join(base, n)
            out.append((os.path.relpath(p, store), os.lstat(p).st_size if n in files else -1))
    return sorted(out)


def refused(mgr, store, expected, builtin, **kw) -> str:
    before = snapshot(store)
    args = {"run_id": "r", "iteration": 1, "state": {"x": np.ones(3)}, **kw}
    messages = []
    for blocking in (True, False):
        with pytest.raises(expected) as e:
            mgr.create_checkpoint(**args, blocking=blocking)
        mgr.wait_until_finished()
        assert isinstance(e.value, ComputableFlowsError) and isinstance(e.value, builtin)
        messages.append(str(e.value))
        assert snapshot(store) == before, f"something was written: {set(snapshot(store)) ^ set(before)}"
    return messages[0]


def test_bad_input_is_refused_before_anything_is_written(tmp_path, figures):
    store = str(tmp_path / "store")
    mgr = CheckpointManager(store)
    mgr.create_checkpoint("ok", 1, {"x": np.ones(2)})
    n = 0
    for name, leaf in LEAVES.items():
        msg = refused(mgr, store, UnsupportedLeafError, TypeError, state={"good": np.ones(2), "bad": leaf})
        assert "state['bad']" in msg, (name, msg)
        n += 1
    for run_id in RUN_IDS:
        refused(mgr, store, InvalidRunIdError, ValueError, run_id=run_id)
        n += 1
    for it in ITERATIONS:
        refused(mgr, store, InvalidIterationError, ValueError, iteration=it)
        n += 1
    for name, cfg in CONFIGS.items():
        for field in ("flow_config", "certificates", "metadata"):
            msg = refused(mgr, store, MetadataError, TypeError, **{field: cfg})
            assert field in msg, (name, msg)
            n += 1
    for name, hist in HISTORIES.items():
        refused(mgr, store, MetadataError, TypeError, telemetry_history=hist)
        n += 1
    # the store still works, and so do rollback and tags, which refuse bad names the same way
    before = snapshot(store)
    with pytest.raises(InvalidRunIdError):
        mgr.rollback_to_checkpoint("ok-i000000000001", "../escape")
    with pytest.raises(InvalidTagError):
        mgr.tag_checkpoint("ok-i000000000001", "../escape")
    assert snapshot(store) == before
    assert mgr.verify_checkpoint("ok-i000000000001").ok
    fig = figures["8. bad input on save (refused before anything is written)"]
    add(fig, "bad inputs (leaves, dtypes, ids, iterations, configs, histories)", n)
    add(fig, "  each tried blocking and non-blocking; store unchanged", 2 * n)
    fig["accepted / wrong error type / bytes written"] = "0 / 0 / 0"
