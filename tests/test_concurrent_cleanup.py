"""Cleanup racing readers, for real: a checkpoint deleted while another thread loads,
verifies or lists it gives CheckpointNotFoundError ("deleted while being read"), never a
misleading CheckpointCorruptError; real damage is still reported as damage."""

import os
import threading
import time

import numpy as np
import pytest

from computable_flows_shim import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointNotFoundError,
    KeepLatest,
)

DELETED = "deleted while being"


@pytest.fixture
def mgr(tmp_path):
    return CheckpointManager(tmp_path / "store", durable=False)


def _small(mgr, it=1):
    return mgr.create_checkpoint(
        "r", it, {"a": np.arange(100_000.0), "b": np.ones(10)}, telemetry_history={"iter": [it], "E": [1.0]}
    )


def test_lazy_view_of_a_deleted_checkpoint(mgr):
    cid = _small(mgr)
    view = mgr.open_checkpoint(cid)
    a = view.state["a"]  # metadata read, no chunk yet
    assert mgr.delete_checkpoint(cid)
    with pytest.raises(CheckpointNotFoundError, match=DELETED):
        a[:10]
    with pytest.raises(CheckpointNotFoundError, match=DELETED):
        _ = view.telemetry
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        mgr.load_checkpoint(cid)


def test_real_damage_is_still_corruption(mgr):
    cid = _small(mgr)
    view = mgr.open_checkpoint(cid)
    os.unlink(os.path.join(mgr.checkpoint_path(cid), "state", "a", "c.0"))
    with pytest.raises(CheckpointCorruptError, match="chunk file missing"):
        mgr.load_checkpoint(cid)
    with pytest.raises(CheckpointCorruptError, match="chunk file missing"):
        view.state["a"][:3]
    assert not mgr.verify_checkpoint(cid).ok


def _race(mgr, source, read, trials=30):
    """Branch ``source`` (hard links: cheap), start ``read`` on the branch in a thread and
    delete the branch part-way through; returns the outcomes."""
    t0 = time.perf_counter()
    read(source)
    duration = time.perf_counter() - t0
    outcomes = []
    rng = np.random.default_rng(0)
    for n in range(trials):
        cid = mgr.rollback_to_checkpoint(source, f"copy{n}")
        result = []

        def reader():
            try:
                read(cid)
                result.append("read")
            except Exception as e:  # noqa: BLE001 - every outcome is checked below
                result.append(e)

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(duration * rng.uniform(0.2, 0.8))
        assert mgr.delete_checkpoint(cid)
        t.join()
        outcomes.append(result[0])
        if sum(isinstance(o, CheckpointNotFoundError) and DELETED in str(o) for o in outcomes) >= 3:
            break
    return outcomes


@pytest.fixture
def big(mgr):
    """64 MiB in 16 chunks of 4 MiB across 4 leaves: a load that takes a while."""
    state = {f"w{i}": np.full((4, 1 << 20), i, np.float32) for i in range(4)}
    return mgr.create_checkpoint("big", 1, state, telemetry_history={"iter": [1], "E": [1.0]})


def test_load_while_deleting(mgr, big):
    outcomes = _race(mgr, big, lambda cid: mgr.load_checkpoint(cid))
    bad = [o for o in outcomes if o != "read" and not isinstance(o, CheckpointNotFoundError)]
    assert not bad, bad  # never "corrupt"
    assert any(isinstance(o, CheckpointNotFoundError) and DELETED in str(o) for o in outcomes), outcomes
    assert mgr.load_checkpoint(big)["state"]["w3"][0, 0] == 3  # the source was never touched


def test_verify_while_deleting(mgr, big):
    def verify(cid):
        report = mgr.verify_checkpoint(cid)
        assert report.ok, report.problems

    outcomes = _race(mgr, big, verify)
    bad = [o for o in outcomes if o != "read" and not isinstance(o, CheckpointNotFoundError)]
    assert not bad, bad
    assert any(isinstance(o, CheckpointNotFoundError) for o in outcomes), outcomes


def test_listing_during_cleanup_warns_about_nothing(mgr):
    """Listing must not call a checkpoint that a cleanup removes under it 'damaged'
    (a CheckpointWarning is an error in this test suite, in every thread)."""
    for it in range(120):
        mgr.create_checkpoint("r", it, {"x": np.full(2, it)})
    errors, stop = [], threading.Event()

    def lister():
        while not stop.is_set():
            try:
                mgr.list_checkpoints("r")
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(e)

    t = threading.Thread(target=lister)
    t.start()
    try:
        report = mgr.apply_retention("r", KeepLatest(1))
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    assert len(report.deleted) == 119 and len(mgr.list_checkpoints("r")) == 1
