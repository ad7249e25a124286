"""Scenario 3 (issue 5): fail the Nth I/O call of a save, for every N.

The forked writer (``_harness.py``) makes call N of a save (every open, write, fsync,
fdatasync, mkdir, link, rename, renameat2) fail with EIO, ENOSPC or EFBIG, once or for
call N and every later call (persistent), and makes the Nth write short (half of what
was asked) or write nothing, once or persistently.  For every trial:

- a save that fails raises ``CheckpointWriteError`` naming the checkpoint, with the
  injected ``OSError`` as its cause; the new checkpoint is not visible;
- a save that succeeds despite the fault (a short write is retried; a failed hard link
  falls back to writing) holds exactly the saved data, and no fsync of it failed;
- the temporary is gone when the save returns, or (only when the fault also keeps the
  cleanup from opening it) when the next manager opens the store;
- the earlier checkpoints are intact; no fsync is ever retried after it failed (after
  a failed fsync the kernel may have dropped the dirty pages: a retry that succeeds
  proves nothing).
"""

from __future__ import annotations

import errno
import os

import pytest

from computable_flows_shim import CheckpointManager

from ._harness import FSYNCS, WRITES, make_save_args
from .conftest import add, assert_checkpoint_is, staging_entries

ERRNOS = ("EIO", "ENOSPC", "EFBIG")


def cid(run: str, it: int) -> str:
    return f"{run}-i{it:012d}"


def fault_sweep(forkserver, store: str, shape: str, figures: dict, op: str = "save") -> None:
    run = shape
    base = [cid(run, 0), cid(run, 1)]
    for i in (0, 1):
        assert forkserver(op="save", store=store, shape=shape, run=run, iteration=i)["result"]["status"] == "ok"
    expected = set(base)

    def command(it: int) -> tuple[dict, str, tuple[str, int]]:
        if op == "save":
            return dict(op="save", store=store, shape=shape, run=run, iteration=it), cid(run, it), (shape, it)
        return dict(op="rollback", store=store, src=base[1], run="branch", iteration=it), cid("branch", it), (shape, 1)

    cmd, new, _ = command(2)
    traced = forkserver(**cmd, plan={"action": "count", "trace": True})["result"]
    assert traced["status"] == "ok"
    CheckpointManager(store).delete_checkpoint(new)
    calls = traced["calls"]
    writes = [e["n"] for e in traced["events"] if e["op"] in WRITES]
    # the tracer saw the operation's calls, writes among them: else the short and zero writes
    # (and, with no call seen, every fault) silently drop out of the sweep below
    assert calls > 0 and writes, traced["events"]
    trials = [(f, p, n) for f in ERRNOS for p in (False, True) for n in range(1, calls + 2)]
    trials += [(f, p, n) for f in ("short", "zero") for p in (False, True) for n in writes]
    fig = figures["3. I/O errors (fail the Nth call, every N)"]
    counts = dict.fromkeys(
        [
            "faults injected",
            "saves failed cleanly",
            "saves succeeded despite the fault",
            "committed, error says so (store fsync and take-back failed)",
            "temporaries the failed save could not remove (persistent fault), removed by the next open",
            "rollbacks refused: source unreadable (read fault)",
        ],
        0,
    )
    it = 10
    for k, (fault, persistent, n) in enumerate(trials):
        cmd, new, new_as = command(it)
        it += 1
        r = forkserver(**cmd, plan={"action": "fault", "fault": fault, "persistent": persistent, "n": n})
        assert r["signal"] is None and r["exit"] == 0, r
        res = r["result"]
        what = f"{fault} {'persistent' if persistent else 'once'} at call {n}"
        assert res["fsync_retries"] == [], (what, res["fsync_retries"])
        injected = res["injected"]
        counts["faults injected"] += len(injected)
        if res["status"] == "ok":
            failed = [i for i in injected if "errno" in i or i.get("fault") == "zero"]
            assert not [i for i in failed if i["op"] in FSYNCS], f"{what}: save succeeded after a failed fsync"
            assert not [i for i in failed if i["op"] in WRITES], f"{what}: a failed write was not reported"
            counts["saves succeeded despite the fault"] += bool(injected)
            mgr = CheckpointManager(store)
            assert_checkpoint_is(mgr, new, make_save_args(*new_as))
            mgr.delete_checkpoint(new)
        elif op == "rollback" and "CheckpointCorruptError" in res["error"]["mro"]:
            # the fault hit reading the source, before anything was written: a clear error naming it
            err, first = res["error"], injected[0]
            assert repr(base[1]) in err["message"] and first["op"] == "open", (what, err)
            assert os.path.join(store, base[1]) in first["path"], (what, first)
            counts["rollbacks refused: source unreadable (read fault)"] += 1
        else:
            err = res["error"]
            assert injected, f"{what}: failed without an injected fault: {err}"
            assert "CheckpointWriteError" in err["mro"], (what, err)
            assert repr(new) in err["message"], (what, err["message"])
            want = errno.EIO if fault in ("zero", "short") else getattr(errno, fault)
            assert err["cause_errno"] == want, (what, err)
            if "was committed, complete" in err["message"]:
                # the store fsync failed after the rename and (persistent fault) renaming it
                # back failed too: the error says the checkpoint is there; it must be whole
                assert persistent, what
                mgr = CheckpointManager(store)
                assert_checkpoint_is(mgr, new, make_save_args(*new_as))
                mgr.delete_checkpoint(new)
                counts["committed, error says so (store fsync and take-back failed)"] += 1
            else:
                counts["saves failed cleanly"] += 1
        if res["staging_left"]:
            # only a persistent fault can keep the failed save from removing its temporary
            # (it cannot even open the directory to remove it); the next manager does
            assert persistent and res["status"] == "error", (what, res["staging_left"])
            counts["temporaries the failed save could not remove (persistent fault), removed by the next open"] += 1
        mgr = CheckpointManager(store)  # what the next job sees
        assert staging_entries(store) == [], what
        assert set(mgr.store.names()) == expected, what
        if k % 100 == 0:
            for c in base:
                assert mgr.verify_checkpoint(c).ok
    mgr = CheckpointManager(store)
    for i, c in enumerate(base):
        assert_checkpoint_is(mgr, c, make_save_args(shape, i))
    label = shape if op == "save" else f"{op} ({shape})"
    fig[f"{label}: trials (I/O calls x faults x once/persistent)"] = len(trials)
    for key, v in counts.items():
        add(fig, key, v)
    add(fig, "trials", len(trials))
    fig["fsync retried after a failure / previous checkpoints damaged"] = "0 / 0"


@pytest.mark.parametrize("shape", ["leaf", "incremental"])
def test_fail_every_io_call_of_a_save(forkserver, tmp_path, shape, figures):
    fault_sweep(forkserver, str(tmp_path / "store"), shape, figures)


def test_fail_every_io_call_of_a_rollback(forkserver, tmp_path, figures):
    fault_sweep(forkserver, str(tmp_path / "store"), "leaf", figures, op="rollback")


@pytest.mark.slow
def test_fail_every_io_call_of_a_big_tree_save(forkserver, tmp_path, figures):
    fault_sweep(forkserver, str(tmp_path / "store"), "tree", figures)
