"""Disk usage: every file counted once per store (hard links from rollbacks and incremental
saves), split into exclusive and shared bytes, and what a cleanup would free."""

import os

import numpy as np
import pytest

from computable_flows_shim import CheckpointManager, KeepLatest


def _files(path):
    out = {}
    for base, _dirs, names in os.walk(path):
        for f in names:
            st = os.lstat(os.path.join(base, f))
            out[(st.st_dev, st.st_ino)] = st.st_size
    return out


def _store_bytes(mgr):
    """Independent count: unique inodes under every committed checkpoint."""
    seen = {}
    for name in mgr.store.names():
        seen.update(_files(mgr.store.path(name)))
    return sum(seen.values())


def _root_json(mgr, cid):
    return os.path.getsize(os.path.join(mgr.checkpoint_path(cid), "zarr.json"))


@pytest.fixture
def mgr(tmp_path):
    return CheckpointManager(tmp_path / "store", durable=False)


def test_rollback_links_are_counted_once(mgr):
    state = {"a": np.arange(300_000, dtype=np.float64), "b": np.ones((64, 64), np.float32)}
    a = mgr.create_checkpoint("r", 10, state, telemetry_history={"iter": [10], "E": [1.0]})
    b = mgr.rollback_to_checkpoint(a, "branch")
    du = mgr.disk_usage()
    ck = {c.checkpoint_id: c for c in du.checkpoints}
    size_a = sum(_files(mgr.checkpoint_path(a)).values())
    assert ck[a].bytes == size_a and ck[a].files == len(_files(mgr.checkpoint_path(a)))
    assert ck[a].exclusive_bytes == _root_json(mgr, a)  # everything else is linked from the branch
    assert ck[b].exclusive_bytes == _root_json(mgr, b)
    assert ck[a].shared_bytes == ck[b].shared_bytes == size_a - _root_json(mgr, a) > 2_400_000
    assert du.total_bytes == _store_bytes(mgr) == size_a + _root_json(mgr, b)  # not twice the arrays
    runs = {r.run_id: r for r in du.runs}
    assert runs["r"].exclusive_bytes == _root_json(mgr, a) and runs["r"].shared_bytes == ck[a].shared_bytes
    assert du.freed_by([a]) == _root_json(mgr, a)
    assert du.freed_by([a, b]) == du.total_bytes
    assert du.freed_by([]) == 0

    # scoped to one run, the links into the other run still make the bytes shared
    only_b = mgr.disk_usage("branch")
    assert [c.checkpoint_id for c in only_b.checkpoints] == [b]
    assert only_b.freed_by([b]) == _root_json(mgr, b)

    before = du.total_bytes
    mgr.delete_checkpoint(a)
    after = mgr.disk_usage()
    assert before - after.total_bytes == du.freed_by([a])
    assert after.checkpoints[0].exclusive_bytes == after.checkpoints[0].bytes  # now the branch owns it all


def test_incremental_saves_share_unchanged_chunks(mgr):
    big = np.arange(2_000_000, dtype=np.float32)  # 2 chunks of 4 MiB
    ids = [mgr.create_checkpoint("r", it, {"big": big, "small": np.full(3, it)}) for it in range(3)]
    assert mgr.last_save_stats is not None and mgr.last_save_stats.chunks_linked >= 2
    du = mgr.disk_usage("r")
    (run,) = du.runs
    assert run.bytes == du.total_bytes == _store_bytes(mgr)
    assert run.bytes < sum(c.bytes for c in du.checkpoints) - 2 * big.nbytes  # big stored once, not 3 times
    assert run.exclusive_bytes == run.bytes  # nothing outside the run links to it
    for c in du.checkpoints:
        assert c.shared_bytes >= big.nbytes
    assert du.freed_by(ids[:2]) < big.nbytes  # the newest still holds the big chunks


def test_gc_frees_what_du_predicted(mgr):
    for it in range(10):
        mgr.create_checkpoint("r", it, {"x": np.full(50_000, it % 3, np.float64)})
    mgr.rollback_to_checkpoint("r-i000000000004", "b")
    du = mgr.disk_usage("r")
    plan = mgr.apply_retention("r", KeepLatest(2), dry_run=True)
    assert "r-i000000000004" in plan.kept  # branched from
    predicted = du.freed_by(plan.deleted)
    before = _store_bytes(mgr)
    mgr.apply_retention("r", KeepLatest(2))
    assert before - _store_bytes(mgr) == predicted > 0


def test_empty_store_and_bad_run(mgr):
    du = mgr.disk_usage()
    assert du.total_bytes == 0 and du.runs == () and du.checkpoints == ()
    assert du.to_dict()["runs"] == []
    from computable_flows_shim import InvalidRunIdError

    with pytest.raises(InvalidRunIdError):
        mgr.disk_usage("../x")
