"""Object-store faults (issue 12, part 4): a real TCP proxy (``s3server.FaultProxy``) in front
of a real moto_server answers 500 and 503 SlowDown, resets connections mid-upload and
mid-download, cuts bodies short and adds latency, for saves, loads, listing, delete and
cleanup.  Transient faults are retried and the operation succeeds; persistent ones raise the
library's error within a bounded time.  After every trial a clean client checks the store:
exactly the checkpoints committed are listed, each loads bit-exactly and verifies, and once
the leases have expired cleanup leaves nothing that no commit record names."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import numpy as np
import pytest
from s3server import Fault, FaultProxy, assert_trees_equal

from computable_flows_shim import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointWarning,
    CheckpointWriteError,
    ObjectStore,
    StoreUnavailableError,
)

FAST_RETRIES = {
    "max_retries": 3,
    "retry_timeout": timedelta(seconds=5),
    "backoff": {"init_backoff": timedelta(milliseconds=10), "max_backoff": timedelta(milliseconds=200), "base": 2},
}
"""Retries of the faulted clients: the defaults' shape, smaller (a persistent fault raises fast)."""
BOUND = 20.0
"""Seconds within which a persistent fault must raise (generous: 4 tries take well under 1 s)."""
LEASE = 0.5
"""Upload lease of the faulted clients, so that cleanup may act on what a failed trial left."""


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((200, 1000)),
        "b": rng.standard_normal(300).astype(np.float32),
        "n": {"count": np.int64(seed), "mu": rng.standard_normal(50)},
    }


# ---------------------------------------------------------------- which requests
def _unq(path: str) -> str:
    from urllib.parse import unquote

    return unquote(path)


def is_list(m: str, p: str) -> bool:
    return m == "GET" and "list-type=2" in p


def is_object_get(m: str, p: str) -> bool:
    return m == "GET" and not is_list(m, p)


def is_marker(m: str, p: str) -> bool:
    return "/.cfs-uploads/" in _unq(p) and not is_list(m, p)


def is_record(m: str, p: str) -> bool:
    return "/.cfs-commits/" in _unq(p) and not is_list(m, p)


def is_data_put(m: str, p: str) -> bool:
    return m == "PUT" and not (is_marker(m, p) or is_record(m, p))


def is_bulk_delete(m: str, p: str) -> bool:
    return m == "POST" and p.endswith("?delete")


def any_request(m: str, p: str) -> bool:
    return True


def _natural(kind: int | str, base: Callable[[str, str], bool]) -> Callable[[str, str], bool]:
    """The requests a kind of fault can hit: an upload's body, a download's body, or any."""
    if kind == "reset-upload":
        return lambda m, p: m in ("PUT", "POST") and base(m, p)
    if kind in ("reset-download", "truncate"):
        return lambda m, p: m == "GET" and base(m, p)
    if kind == "short":  # objects only: a cut listing is refused by the XML parser, not our checks
        return lambda m, p: is_object_get(m, p) and base(m, p)
    return base


def _fault(kind: int | str, base: Callable[[str, str], bool], **kw) -> Fault:
    return Fault(_natural(kind, base), kind, delay=0.05 if kind == "delay" else 0.0, **kw)


# ---------------------------------------------------------------- the store, seen by a clean client
def _clean(url: str) -> CheckpointManager:
    return CheckpointManager(ObjectStore(url, upload_lease=3600))


def _faulted(url: str, proxy: FaultProxy, lease: float = LEASE, **kw) -> ObjectStore:
    return ObjectStore(url, endpoint=proxy.endpoint, retry_config=FAST_RETRIES, upload_lease=lease, **kw)


def _garbage(url: str, s3_server) -> set[str]:
    """Keys no commit record owns: upload markers and uncommitted or orphaned data."""
    store = ObjectStore(url, upload_lease=3600)
    prefix = url.split("/", 3)[3]
    owned = set()
    for cid in store.names():
        rec = json.loads(store._get(f".cfs-commits/{cid}.json"))
        owned |= {f"{prefix}/{rec['data']}/{k}" for k in rec["objects"]} | {f"{prefix}/.cfs-commits/{cid}.json"}
    return set(s3_server.keys(url.split("/")[2])) - owned


def _check_store(url: str, s3_server, expected: dict[str, dict], *, cleanup: bool = True) -> None:
    """Nothing lost, nothing partial, nothing silently wrong: exactly ``expected`` is listed,
    each loads bit-exactly and verifies; after the leases, cleanup leaves only committed objects."""
    mgr = _clean(url)
    assert sorted(i.checkpoint_id for i in mgr.list_checkpoints()) == sorted(expected)
    for cid, state in expected.items():
        assert_trees_equal(mgr.load_checkpoint(cid)["state"], state)
        assert mgr.verify_checkpoint(cid).ok
    if cleanup and _garbage(url, s3_server):
        time.sleep(LEASE + 0.1)  # what the failure left: cleanup removes it once its lease expired
        ObjectStore(url, upload_lease=3600).cleanup_stale()
        assert _garbage(url, s3_server) == set()
        assert sorted(i.checkpoint_id for i in _clean(url).list_checkpoints()) == sorted(expected)


# ---------------------------------------------------------------- transient faults: retried, whole
KINDS = [500, 503, "reset-upload", "reset-download", "truncate", "short", "delay"]


def _kinds(*kinds: int | str, slow: tuple = ()) -> list:
    """500 behaves as 503 (both 5xx, both retried by obstore): the default run keeps 503 and
    leaves 500, and the kinds in ``slow``, to ``-m slow`` (the whole file stays near a minute)."""
    return [pytest.param(k, marks=pytest.mark.slow) if k == 500 or k in slow else k for k in kinds]


@pytest.mark.parametrize("kind", _kinds(*KINDS))
def test_transient_faults_are_retried_and_every_operation_succeeds(s3_url, s3_server, kind):
    """Save, load, list, delete and cleanup through a proxy that faults every request the
    fault can hit twice (its third try gets through; once for a body cut short, which only
    our checks can tell and our reader reads again once): each operation succeeds, whole."""
    clean = _clean(s3_url)
    s0, s1 = _state(0), _state(1)
    c0 = clean.create_checkpoint("f", 1, s0)
    fault = _fault(kind, any_request, times=None, each=1 if kind == "short" else 2)
    hits = {}
    with FaultProxy(s3_server.port, [fault]) as proxy:
        mgr = CheckpointManager(_faulted(s3_url, proxy))
        before = fault.hits
        c1 = mgr.create_checkpoint("f", 2, s1)
        hits["save"], before = fault.hits - before, fault.hits
        fault.per_request.clear()  # each operation meets the fault afresh (a bulk delete's path is the bucket's)
        assert_trees_equal(
            CheckpointManager(_faulted(s3_url, proxy)).load_checkpoint(c0)["state"], s0
        )  # a fresh mirror
        hits["load"], before = fault.hits - before, fault.hits
        fault.per_request.clear()
        assert [i.checkpoint_id for i in mgr.list_checkpoints()] == [c1, c0]
        hits["list"], before = fault.hits - before, fault.hits
        fault.per_request.clear()
        assert mgr.delete_checkpoint(c0)
        hits["delete"] = fault.hits - before
        fault.per_request.clear()
        # cleanup's work: an expired upload, and the data of a delete that died (no marker)
        store = ObjectStore(s3_url, upload_lease=3600)
        store._put(".cfs-uploads/f-i000000000007/" + "a" * 24 + ".json", b'{"expires_at_unix": 0}')
        store._put("f-i000000000007/" + "a" * 24 + "/zarr.json", b"{}")
        store._put("f-i000000000008/" + "b" * 24 + "/zarr.json", b"{}")
        before = fault.hits
        assert _faulted(s3_url, proxy).cleanup_stale() == 2
        hits["cleanup"] = fault.hits - before
    # every operation met the fault (except where it cannot: no upload in a load or a listing)
    untouched = {"load", "list"} if kind == "reset-upload" else set()
    assert {op for op, n in hits.items() if n == 0} == untouched, hits
    _check_store(s3_url, s3_server, {c1: s1})


def test_default_retries_ride_out_a_burst_of_slowdowns(s3_url, s3_server):
    """``DEFAULT_RETRY_CONFIG`` (no retry options given): five 503 SlowDown answers in a row to
    the first request (the opening cleanup's LIST) and to the first object GETs of a load are
    retried with backoff."""
    with FaultProxy(s3_server.port, [Fault(any_request, 503, times=5), Fault(is_object_get, 503, times=5)]) as proxy:
        mgr = CheckpointManager(ObjectStore(s3_url, endpoint=proxy.endpoint))
        state = _state(2)
        cid = mgr.create_checkpoint("d", 1, state)
        assert_trees_equal(
            CheckpointManager(ObjectStore(s3_url, endpoint=proxy.endpoint)).load_checkpoint(cid)["state"], state
        )
    assert proxy.hits(503) == 10
    _check_store(s3_url, s3_server, {cid: state}, cleanup=False)


# ---------------------------------------------------------------- persistent faults: our error, bounded
SAVE_TARGETS = {
    "objects": is_data_put,
    "record": lambda m, p: m == "PUT" and is_record(m, p),
    "marker": lambda m, p: m == "PUT" and is_marker(m, p),
}


@pytest.mark.parametrize("target", list(SAVE_TARGETS))
@pytest.mark.parametrize("kind", _kinds(500, 503, "reset-upload"))
def test_a_save_under_a_persistent_fault_raises_and_commits_nothing(s3_url, s3_server, kind, target):
    clean = _clean(s3_url)
    s0 = _state(0)
    c0 = clean.create_checkpoint("p", 1, s0)
    with FaultProxy(s3_server.port, [_fault(kind, SAVE_TARGETS[target], times=None)]) as proxy:
        mgr = CheckpointManager(_faulted(s3_url, proxy))
        t = time.monotonic()
        # the marker's PUT is the store refusing before anything was written; after it, the save fails
        with pytest.raises(StoreUnavailableError if target == "marker" else CheckpointWriteError) as e:
            mgr.create_checkpoint("p", 2, _state(1))
        assert time.monotonic() - t < BOUND
    assert proxy.hits(kind) >= 1
    assert "p-i000000000002" in str(e.value) or target == "marker"
    assert not _clean(s3_url).store.exists("p-i000000000002")  # no commit record
    _check_store(s3_url, s3_server, {c0: s0})


@pytest.mark.parametrize("kind", _kinds(500, 503, "reset-download", "truncate", "short", slow=("reset-download",)))
def test_a_load_under_a_persistent_fault_raises_our_error_naming_the_object(s3_url, s3_server, kind):
    s0 = _state(0)
    c0 = _clean(s3_url).create_checkpoint("l", 1, s0)
    chunk = "/state/w/c.0.0"
    with FaultProxy(s3_server.port, [_fault(kind, lambda m, p: chunk in p, times=None)]) as proxy:
        mgr = CheckpointManager(_faulted(s3_url, proxy))
        t = time.monotonic()
        error = CheckpointCorruptError if kind == "short" else StoreUnavailableError
        with pytest.raises(error, match=rf"{c0}/[0-9a-f]{{24}}{chunk}") as e:
            mgr.load_checkpoint(c0)
        assert time.monotonic() - t < BOUND
        if kind == "short":  # read twice, cut short twice: damage, never wrong bytes
            assert "read twice" in str(e.value) and c0 in str(e.value)
    assert proxy.hits(kind) >= 1
    _check_store(s3_url, s3_server, {c0: s0})


@pytest.mark.parametrize("kind", _kinds(500, 503, "reset-download", "truncate", slow=("reset-download",)))
def test_listing_under_a_persistent_fault_raises_not_an_empty_list(s3_url, s3_server, kind):
    s0 = _state(0)
    c0 = _clean(s3_url).create_checkpoint("s", 1, s0)
    with FaultProxy(s3_server.port, [_fault(kind, is_list, times=None)]) as proxy:
        store = _faulted(s3_url, proxy)
        t = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="LIST"):
            CheckpointManager(store)  # its cleanup lists
        with pytest.raises(StoreUnavailableError, match="LIST"):
            store.names()
        assert time.monotonic() - t < 2 * BOUND
    assert proxy.hits(kind) >= 2
    _check_store(s3_url, s3_server, {c0: s0})


@pytest.mark.parametrize("step", ["record", "objects", "marker"])
@pytest.mark.parametrize("kind", _kinds(500, 503, "reset-upload", slow=("reset-upload",)))
def test_a_delete_under_a_persistent_fault_leaves_whole_or_nothing(s3_url, s3_server, kind, step):
    """A delete failing at its marker's PUT leaves the checkpoint whole; at the record's DELETE,
    whole; at the objects' DELETE, gone, and its objects left to cleanup (by the marker)."""
    s0 = _state(0)
    mgr = _clean(s3_url)
    c0 = mgr.create_checkpoint("x", 1, s0)
    c1 = mgr.create_checkpoint("x", 2, _state(1))
    # a delete's requests: PUT marker, POST ?delete (the record), LIST, POST ?delete (the objects)
    fault = {
        "marker": _fault(kind, lambda m, p: m == "PUT" and is_marker(m, p), times=None),
        "record": _fault(kind, is_bulk_delete, times=None),
        "objects": _fault(kind, is_bulk_delete, times=None, skip=1),
    }[step]
    with FaultProxy(s3_server.port, [fault]) as proxy:
        store = _faulted(s3_url, proxy)
        t = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            CheckpointManager(store).delete_checkpoint(c1)
        assert time.monotonic() - t < BOUND
    assert proxy.hits(kind) >= 1
    _check_store(s3_url, s3_server, {c0: s0} if step == "objects" else {c0: s0, c1: _state(1)})


@pytest.mark.parametrize("kind", _kinds(500, 503))
def test_cleanup_under_persistent_faults_warns_and_a_later_cleanup_finishes(s3_url, s3_server, kind):
    s0 = _state(0)
    c0 = _clean(s3_url).create_checkpoint("c", 1, s0)
    store = ObjectStore(s3_url, upload_lease=3600)
    store._put(".cfs-uploads/c-i000000000007/" + "a" * 24 + ".json", b'{"expires_at_unix": 0}')
    store._put("c-i000000000007/" + "a" * 24 + "/zarr.json", b"{}")
    with FaultProxy(s3_server.port, [Fault(lambda m, p: m in ("DELETE", "POST"), kind, times=None)]) as proxy:
        t = time.monotonic()
        with pytest.warns(CheckpointWarning, match="could not delete"):
            assert _faulted(s3_url, proxy).cleanup_stale() == 0
        assert time.monotonic() - t < BOUND
    assert proxy.hits(kind) >= 1
    assert _garbage(s3_url, s3_server)  # left for later...
    _check_store(s3_url, s3_server, {c0: s0})  # ...which removes it


# ---------------------------------------------------------------- the lease
def _cleaner(url: str, stop: threading.Event, runs: list[int]) -> threading.Thread:
    """Another manager's cleanup, over and over, straight to the server."""

    def loop() -> None:
        while not stop.wait(0.1):
            runs.append(ObjectStore(url, upload_lease=LEASE).cleanup_stale())

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def test_a_save_outliving_its_first_lease_renews_it_and_commits_whole(s3_url, s3_server):
    """Lease 0.5 s; the root zarr.json's PUT (the upload's last) takes 1.5 s more; a cleaner runs
    every 0.1 s.  The marker is renewed, the cleaner leaves the upload alone, the save commits."""
    state = _state(3)
    slow_root = Fault(lambda m, p: m == "PUT" and re.search(r"/[0-9a-f]{24}/zarr\.json$", p), "delay", delay=1.5)
    stop, runs = threading.Event(), []
    with FaultProxy(s3_server.port, [slow_root]) as proxy:
        cleaner = _cleaner(s3_url, stop, runs)
        try:
            cid = CheckpointManager(_faulted(s3_url, proxy)).create_checkpoint("lease", 1, state)
        finally:
            stop.set()
            cleaner.join()
    assert slow_root.hits == 1 and len(runs) >= 10
    assert len([r for r in proxy.requests if r[0] == "PUT" and is_marker(*r[:2])]) >= 3  # renewed
    _check_store(s3_url, s3_server, {cid: state})


def test_a_save_whose_lease_is_lost_takes_its_record_back(s3_url, s3_server):
    """Lease 0.5 s, every renewal refused (500), the commit record's PUT held 1.5 s in the network
    while a cleaner runs: the cleaner removes the upload before the record lands.  The save
    raises and takes the record back: no checkpoint naming deleted objects is left."""
    renewals = Fault(lambda m, p: m == "PUT" and is_marker(m, p), 500, times=None, skip=1)
    slow_record = Fault(lambda m, p: m == "PUT" and is_record(m, p), "delay", delay=1.5)
    stop, runs = threading.Event(), []
    with FaultProxy(s3_server.port, [renewals, slow_record]) as proxy:
        cleaner = _cleaner(s3_url, stop, runs)
        t = time.monotonic()
        try:
            with pytest.raises(CheckpointWriteError, match="outlived its lease"):
                CheckpointManager(_faulted(s3_url, proxy)).create_checkpoint("lost", 1, _state(4))
        finally:
            stop.set()
            cleaner.join()
        assert time.monotonic() - t < BOUND
    assert renewals.hits >= 1 and slow_record.hits == 1 and sum(runs) >= 1  # the cleaner took the upload
    _check_store(s3_url, s3_server, {})


# ---------------------------------------------------------------- an interrupted delete, the id committed again
def test_cleanup_removes_what_an_interrupted_delete_left_for_an_id_committed_again(s3_url, s3_server):
    """A delete dies after its record's DELETE (the objects' DELETE refused), the same id is
    committed again under a new token: cleanup removes the old token's objects (found by the
    delete's marker) and leaves the new checkpoint whole."""
    mgr = _clean(s3_url)
    keep = _state(5)
    c_keep = mgr.create_checkpoint("re", 1, keep)
    cid = mgr.create_checkpoint("re", 2, _state(6))
    old = mgr.store._committed(cid)["data"]
    refuse = Fault(is_bulk_delete, 500, times=None, skip=1)  # the record's DELETE passes, the objects' not
    with FaultProxy(s3_server.port, [refuse]) as proxy:
        with pytest.raises(StoreUnavailableError):
            CheckpointManager(_faulted(s3_url, proxy)).delete_checkpoint(cid)
    assert refuse.hits >= 1 and not mgr.store.exists(cid)
    again = _state(7)
    assert mgr.create_checkpoint("re", 2, again) == cid
    assert mgr.store._committed(cid)["data"] != old
    assert any(k.startswith(f"ckpt/{old}/") for k in s3_server.keys(s3_url.split("/")[2]))
    _check_store(s3_url, s3_server, {c_keep: keep, cid: again})  # cleanup after the lease: no garbage
    assert not any(k.startswith(f"ckpt/{old}/") for k in s3_server.keys(s3_url.split("/")[2]))
