"""Fixtures of the reliability suite: the fork server, store checks, and the figures table.

Every scenario adds its counts to ``figures`` (scenario -> {figure: number}); at the end
pytest prints them as one table ("reliability figures"), and writes them as JSON to
``$CFS_RELIABILITY_FIGURES`` when that is set: the README's table comes from there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from computable_flows_shim import CheckpointManager

HERE = os.path.dirname(os.path.abspath(__file__))
HARNESS = os.path.join(HERE, "_harness.py")

_FIGURES: dict[str, dict[str, int | float | str]] = defaultdict(dict)


@pytest.fixture(scope="session")
def figures():
    return _FIGURES


def add(fig: dict, key: str, n: int) -> None:
    """Add ``n`` to a figure (tests of one scenario add up)."""
    fig[key] = fig.get(key, 0) + n


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _FIGURES:
        return
    if exitstatus != 0:  # a failed scenario's counts describe nothing that was shown: withhold all of them
        terminalreporter.write_sep("=", "reliability figures withheld: the run did not pass")
        return
    terminalreporter.write_sep("=", "reliability figures")
    for scenario, figs in _FIGURES.items():
        terminalreporter.write_line(f"{scenario}:")
        for k, v in figs.items():
            terminalreporter.write_line(f"    {k:<58} {v}")
    path = os.environ.get("CFS_RELIABILITY_FIGURES")
    if path:
        with open(path, "w") as f:
            json.dump(_FIGURES, f, indent=1, sort_keys=True)


class ForkServer:
    """Client of ``_harness.py``: one process that imports the library once and forks a
    child per save (see its docstring)."""

    def __init__(self) -> None:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        self.proc = subprocess.Popen(
            [sys.executable, HARNESS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def __call__(self, **cmd) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture(scope="session")
def forkserver():
    s = ForkServer()
    yield s
    s.close()


def assert_same_tree(got, want, where=""):
    """Bit-exact equality of two pytrees as the library returns them (numpy leaves;
    custom nodes and namedtuples compared by their children)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (where, got, want)
        for k in want:
            assert_same_tree(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), (where, got, want)
        assert type(got) is type(want) or (hasattr(want, "_fields") and hasattr(got, "_fields")), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_tree(g, w, f"{where}[{i}]")
    elif isinstance(want, (np.ndarray, np.generic)):
        assert type(got) is type(want) or isinstance(got, np.ndarray), (where, type(got), type(want))
        g, w = np.asarray(got), np.asarray(want)
        assert g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes(), where
    else:
        assert type(got) is type(want) and got == want, (where, got, want)


def assert_checkpoint_is(mgr: CheckpointManager, cid: str, args: dict) -> None:
    """``cid`` loads exactly what ``create_checkpoint(**args)`` saved, and verifies."""
    out = mgr.load_checkpoint(cid)
    assert_same_tree(out["state"], args["state"], cid)
    assert out["flow_config"] == args.get("flow_config", {}) or out["flow_config"] == _jsonish(args["flow_config"])
    hist = args.get("telemetry_history") or {}
    for k, v in hist.items():
        if k == "events":
            assert len(out["telemetry"]["events"]) == len(v)
        else:
            got = out["telemetry"][k]
            assert list(got) == list(v) if got.dtype == object else got.tobytes() == np.asarray(v).tobytes(), k
    report = mgr.verify_checkpoint(cid)
    assert report.ok, report.problems


def _jsonish(x):
    return json.loads(json.dumps(x))


def staging_entries(store: str) -> list[str]:
    d = os.path.join(store, ".cfs-staging")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []
