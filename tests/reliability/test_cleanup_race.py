"""Stale cleanup racing a writer's staging lock (issue 12, part 1).

A staging directory ``.cfs-staging/<token>/`` belongs to the writer holding the ``flock`` of
``<token>.lock``; stale cleanup removes only what no live process holds.  The danger is the
window between a cleaner finding a lock free and its removing the lock file: a writer that
takes the lock in that window holds a lock on a file that is then unlinked, and the next
cleaner, finding no lock file, deletes the writer's staging directory under it.

``test_forced_interleaving`` drives that exact schedule with real ``flock`` calls on real
files, two threads (``flock`` locks belong to open file descriptions, so two threads'
locks conflict exactly like two processes'), and barriers at the system-call boundary: the
library code runs unmodified.  ``test_writers_and_cleaners`` is the same race left to the
scheduler: writer processes saving while other processes open the store over and over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from computable_flows_shim import CheckpointManager, CheckpointWriteError
from computable_flows_shim.store._local import LocalDirectoryStore

from .conftest import HERE, add, staging_entries

fcntl = pytest.importorskip("fcntl", reason="flock races: POSIX only (Windows locks differently, spec 3.4)")


def test_forced_interleaving(tmp_path, monkeypatch, figures):
    """Schedule: the writer creates its lock file; a cleaner finds it unlocked; the writer
    asks for the lock at once; the cleaner removes the lock file only after the writer got
    its chance to take the lock and create its staging directory (or after 2 s); a second
    cleaner (a new manager) runs while the writer is still writing.  The save must commit
    whole and nothing may be left over.

    Before the fix the cleaner let go of the lock before unlinking, the writer got in
    (``waits["cleaner-unlink"]`` True) and the second cleaner deleted its staging directory.
    Now the cleaner unlinks while holding the lock, so the writer cannot get in first
    (``waits["cleaner-unlink"]`` False, the 2 s pass), finds its lock file gone and starts
    again under a new token."""
    root = str(tmp_path / "store")
    mgr = CheckpointManager(root)
    staging_root = os.path.join(root, ".cfs-staging")
    lock_created = threading.Event()  # the writer's lock file exists, not locked yet
    probed = threading.Event()  # the cleaner holds (held) the lock
    staged = threading.Event()  # the writer made its staging directory
    cleaners_done = threading.Event()
    waits: dict[str, bool] = {}

    real_flock, real_unlink, real_mkdir = fcntl.flock, os.unlink, os.mkdir

    def in_writer() -> bool:
        return threading.current_thread().name == "writer"

    def flock(fd, op):
        if in_writer() and op == fcntl.LOCK_EX and "writer-flock" not in waits:
            lock_created.set()
            waits["writer-flock"] = probed.wait(10)
            return real_flock(fd, op)
        result = real_flock(fd, op)
        if not in_writer() and op & fcntl.LOCK_NB:
            probed.set()  # the cleaner got it: the writer now waits for the lock, for real
            threading.Event().wait(0.2)
        return result

    def unlink(path, *a, **k):
        if not in_writer() and os.fspath(path).endswith(".lock"):
            # the cleaner removes a lock file only after the writer had its chance to take it
            waits.setdefault("cleaner-unlink", staged.wait(2))
        return real_unlink(path, *a, **k)

    def mkdir(path, *a, **k):
        out = real_mkdir(path, *a, **k)
        if in_writer() and os.path.dirname(os.fspath(path)) == staging_root:
            staged.set()
            waits["writer-staged"] = cleaners_done.wait(10)
        return out

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "mkdir", mkdir)

    state = {"x": np.arange(1000.0), "y": np.ones((3, 4), np.float32)}
    outcome: list = []

    def writer():
        try:
            outcome.append(mgr.create_checkpoint("r", 1, state))
        except Exception as e:  # noqa: BLE001 - checked below
            outcome.append(e)

    w = threading.Thread(target=writer, name="writer")
    w.start()
    assert lock_created.wait(10), "the writer never created its lock file"
    LocalDirectoryStore(root).cleanup_stale()  # the cleaner that finds the lock free
    CheckpointManager(root)  # a second cleaner while the writer writes
    cleaners_done.set()
    w.join(30)
    monkeypatch.undo()
    assert not w.is_alive()
    # the schedule really happened: the writer waited for the cleaner's probe, and made its
    # staging directory before the second cleaner was done
    assert waits.get("writer-flock") is True and waits.get("writer-staged") is True, waits
    assert "cleaner-unlink" in waits, waits
    assert outcome == ["r-i000000000001"], outcome
    out = CheckpointManager(root).load_checkpoint("r-i000000000001")
    assert out["state"]["x"].tobytes() == state["x"].tobytes()
    assert out["state"]["y"].tobytes() == state["y"].tobytes()
    assert staging_entries(root) == []
    fig = figures["6b. stale cleanup racing writers"]
    add(fig, "forced interleavings (cleaner in the lock gap): save committed", 1)


STRESS = r"""
import json, os, sys, time
import numpy as np
from computable_flows_shim import CheckpointManager, CheckpointWriteError
role, root, ident, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if role == "writer":
    mgr = CheckpointManager(root)
    for i in range(n):
        x = np.full(64, ident * 1000 + i, np.int64)
        try:
            cid = mgr.create_checkpoint(f"w{ident}", i, {"x": x})
            print(json.dumps({"ok": cid}), flush=True)
        except Exception as e:
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
else:
    deadline = time.time() + 120
    opened = 0
    while not os.path.exists(os.path.join(os.path.dirname(root), "stop")) and time.time() < deadline:
        CheckpointManager(root)
        opened += 1
    print(json.dumps({"opened": opened}), flush=True)
"""


@pytest.mark.parametrize("saves", [pytest.param(60, id="60"), pytest.param(600, id="600", marks=pytest.mark.slow)])
def test_writers_and_cleaners(tmp_path, saves, figures):
    """Three writer processes save while two processes open the store (stale cleanup) in a
    loop: no save fails, every checkpoint loads exactly, nothing is left in staging."""
    root = str(tmp_path / "store")
    CheckpointManager(root)
    env = dict(os.environ, JAX_PLATFORMS="cpu")

    def start(*args):
        return subprocess.Popen(
            [sys.executable, "-c", STRESS, *map(str, args)], stdout=subprocess.PIPE, text=True, env=env, cwd=HERE
        )

    cleaners = [start("cleaner", root, c, 0) for c in range(2)]
    writers = [start("writer", root, w, saves) for w in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in writers]
    open(tmp_path / "stop", "w").close()
    opened = sum(json.loads(p.communicate(timeout=60)[0])["opened"] for p in cleaners)
    assert all(p.returncode == 0 for p in writers + cleaners)
    results = [json.loads(line) for out in outs for line in out.splitlines()]
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, errors[:3]
    assert len(results) == 3 * saves
    mgr = CheckpointManager(root)
    for w in range(3):
        for i in range(saves):
            x = mgr.load_checkpoint(f"w{w}-i{i:012d}")["state"]["x"]
            assert x.tobytes() == np.full(64, w * 1000 + i, np.int64).tobytes()
    assert staging_entries(root) == []
    assert opened > 0
    fig = figures["6b. stale cleanup racing writers"]
    add(fig, "saves by 3 writer processes during stale cleanups: committed, loaded exactly", 3 * saves)
    add(fig, "store openings (stale cleanups) by 2 processes meanwhile", opened)
    fig["failed saves / staging left behind"] = "0 / 0"


def test_a_writer_whose_lock_file_vanished_does_not_commit(tmp_path):
    """The writer's own check, for a cleaner that removes a held lock's file anyway (an older
    version, a person with ``rm``): the save raises and publishes nothing."""
    store = LocalDirectoryStore(tmp_path / "store")
    with pytest.raises(CheckpointWriteError, match="lock of its staging directory .* was removed"):
        with store.staging("r-i000000000001") as (tmp, commit):
            with open(os.path.join(tmp, "zarr.json"), "w") as f:
                f.write("{}")
            os.unlink(tmp + ".lock")
            commit()
    assert store.names() == [] and staging_entries(store.root) == []
