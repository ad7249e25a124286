"""The object-store backend against a real S3-protocol server on loopback (moto_server,
started by the tests): the manager's whole surface on ``s3://`` URLs, the commit protocol
(conditional commit record, uploads under their own token, lease-based cleanup), hostile
commit records, and other tools reading committed checkpoints through their own stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import timedelta

import numpy as np
import pytest
from s3server import assert_trees_equal

from computable_flows_shim import (
    CheckpointCorruptError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointManager,
    CheckpointNotFoundError,
    KeepLatest,
    ObjectStore,
    StoreUnavailableError,
)


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((700, 1000)),  # 5.3 MiB: two chunks
        "b": rng.standard_normal(7).astype(np.float32),
        "opt": {"count": np.int64(3), "mu": rng.standard_normal(300)},
    }


def _bucket(url: str) -> str:
    return url.split("/")[2]


def test_manager_surface_on_s3(s3_url, s3_server):
    mgr = CheckpointManager(s3_url)
    assert isinstance(mgr.store, ObjectStore)
    s0, s1 = _state(0), _state(1)
    c0 = mgr.create_checkpoint("run", 10, s0, {"lr": 0.1}, telemetry_history={"energy": [3.0, 2.0]})
    c1 = mgr.create_checkpoint("run", 20, s1, {"lr": 0.1}, blocking=False)
    mgr.wait_until_finished()
    mgr.create_checkpoint("other", 5, {"x": np.arange(3)})
    with pytest.raises(CheckpointExistsError):
        mgr.create_checkpoint("run", 10, s1)

    # a second manager (a fresh mirror) sees exactly what was committed
    mgr2 = CheckpointManager(s3_url)
    assert [i.checkpoint_id for i in mgr2.list_checkpoints("run")] == [c1, c0]
    assert mgr2.get_latest_checkpoint("run") == c1
    out = mgr2.load_checkpoint(c0)
    assert_trees_equal(out["state"], s0)
    assert out["flow_config"] == {"lr": 0.1}
    np.testing.assert_array_equal(out["telemetry"]["energy"], [3.0, 2.0])
    assert mgr2.verify_checkpoint(c1).ok
    url = mgr2.checkpoint_path(c0)
    assert url.startswith(s3_url + "/" + c0 + "/")

    # lazy (a fresh manager, so nothing is fetched yet): a row slice fetches one 4 MiB chunk of w
    # (of two) and a little metadata, and writes no chunk file
    lazy = CheckpointManager(s3_url)
    view = lazy.open_checkpoint(c1)
    before = lazy.store.bytes_read
    np.testing.assert_array_equal(view.state["w"][3:5, 10:20], s1["w"][3:5, 10:20])
    assert 4_192_004 <= lazy.store.bytes_read - before < 4_192_004 + (64 << 10)  # 524 rows x 8000 B + CRC
    mirror = lazy.store.path(c1)
    assert not [f for _, _, fs in os.walk(mirror) for f in fs if f.startswith("c.")]

    # rollback, tags, retention, delete
    branch = mgr2.rollback_to_checkpoint(c0, "branch")
    assert_trees_equal(mgr2.load_checkpoint(branch)["state"], s0)
    assert mgr2.load_checkpoint(branch)["lineage"]["rollback_from"] == c0
    assert mgr2.tag_checkpoint(c0, "best") and not mgr2.tag_checkpoint(c0, "best")
    assert mgr2.tagged() == {c0: ["best"]}
    c2 = mgr2.create_checkpoint("run", 30, s1)
    report = mgr2.apply_retention("run", KeepLatest(1))
    assert report.deleted == [c1]  # the latest and the tagged checkpoint are kept
    assert mgr2.delete_checkpoint(c2) and not mgr2.delete_checkpoint(c2)
    assert not mgr2.store.exists(c2)
    with pytest.raises(CheckpointNotFoundError):
        mgr2.load_checkpoint(c2)
    assert mgr2.untag_checkpoint(c0, "best") and mgr2.tagged() == {}
    assert mgr2.delete_checkpoint(c0)
    assert {i.checkpoint_id for i in mgr2.list_checkpoints()} == {branch, "other-i000000000005"}

    # nothing left of deleted checkpoints, no upload markers
    keys = s3_server.keys(_bucket(s3_url))
    assert not [k for k in keys if c0 in k or c1 in k or c2 in k], keys
    assert not [k for k in keys if "/.cfs-uploads/" in k]


def test_objects_are_the_directory_store_files(s3_url, tmp_path):
    """The bytes of every object equal the file a directory store writes for the same save."""
    state = _state(3)
    local = CheckpointManager(tmp_path / "local")
    cid = local.create_checkpoint("r", 1, state)
    remote = CheckpointManager(s3_url)
    remote.create_checkpoint("r", 1, state)
    d = local.checkpoint_path(cid)
    files = sorted(os.path.relpath(os.path.join(b, f), d) for b, _, fs in os.walk(d) for f in fs)
    mirror = remote.store.materialize(cid)
    assert sorted(os.path.relpath(os.path.join(b, f), mirror) for b, _, fs in os.walk(mirror) for f in fs) == files
    for f in files:
        if f != "zarr.json":  # the root holds created_at
            with open(os.path.join(d, f), "rb") as a, open(os.path.join(mirror, f), "rb") as b:
                assert a.read() == b.read(), f


def test_other_tools_read_a_committed_checkpoint_over_s3(s3_url):
    """zarr-python and xarray open the checkpoint through zarr's own object store, given
    only the URL: no code of this package reads the bytes."""
    state = _state(4)
    mgr = CheckpointManager(s3_url)
    cid = mgr.create_checkpoint("r", 1, state, telemetry_history={"energy": [1.0, 0.5, 0.25]})
    script = textwrap.dedent(
        """
        import sys, numpy as np, zarr, xarray as xr
        from obstore.store import from_url
        from zarr.storage import ObjectStore
        store = ObjectStore(from_url(sys.argv[1], client_options={"allow_http": True}), read_only=True)
        g = zarr.open_group(store, mode="r")
        w = g["state/w"]
        ds = xr.open_zarr(store, group="telemetry")
        assert "computable_flows_shim" not in sys.modules
        print(w.shape, float(w[5, 7]), ds["energy"].values.tolist())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, mgr.checkpoint_path(cid)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(700,", "1000)", repr(float(state["w"][5, 7])), "[1.0,", "0.5,", "0.25]"]


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from computable_flows_shim import CheckpointManager, CheckpointExistsError, ObjectStore
    url, run, start, value = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    mgr = CheckpointManager(ObjectStore(url, upload_lease=float(sys.argv[5])))
    state = {f"leaf{i:02d}": np.full(40_000, value + i) for i in range(24)}  # 24 x 320 KB
    print("ready", flush=True)
    for it in range(start, start + 10_000):
        try:
            print(mgr.create_checkpoint(run, it, state), flush=True)
        except CheckpointExistsError:
            print("exists", flush=True)
    """
)


def _writer(url: str, run: str, start: int, value: float, lease: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, url, run, str(start), str(value), str(lease)],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def _check_all_whole(url: str) -> list[str]:
    mgr = CheckpointManager(ObjectStore(url, upload_lease=3600))
    ids = [i.checkpoint_id for i in mgr.list_checkpoints()]
    for cid in ids:
        state = mgr.load_checkpoint(cid)["state"]
        values = {float(v[0]) for v in state.values()}
        assert len(state) == 24 and len(values) == 24, cid  # all 24 leaves, all from one writer
        assert all((v == v[0]).all() for v in state.values()), cid
        assert mgr.verify_checkpoint(cid).ok
    return ids


def _garbage(s3_url: str, s3_server) -> set[str]:
    """Keys no commit record owns (upload markers and uncommitted data)."""
    store = ObjectStore(s3_url, upload_lease=3600)
    owned = set()
    for cid in store.names():
        rec = json.loads(store._get(f".cfs-commits/{cid}.json"))
        owned |= {f"ckpt/{rec['data']}/{k}" for k in rec["objects"]} | {f"ckpt/.cfs-commits/{cid}.json"}
    return set(s3_server.keys(_bucket(s3_url))) - owned


def test_random_kills_during_saves_leave_nothing_partial(s3_url, s3_server):
    """Writers SIGKILLed at random moments (a save takes ~100 ms, so most land mid-upload):
    every listed checkpoint loads whole and verifies, and once the killed uploads' leases
    (1 s here) expire, cleanup (each new writer's manager runs it) leaves only objects
    that commit records name."""
    rng = np.random.default_rng(7)
    lease, mid_upload, pids = 1.0, 0, []
    for k in range(10):
        p = _writer(s3_url, "kill", 1000 * k, float(k), lease)
        pids.append(p.pid)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.5)))
        p.kill()
        p.wait()
        p.stdout.close()
        mid_upload += bool(_garbage(s3_url, s3_server))
    ids = _check_all_whole(s3_url)
    assert ids, "no save committed: the test did not exercise commits"
    assert mid_upload >= 1, "no kill landed mid-upload: the test did not exercise the protocol"
    time.sleep(lease + 0.1)
    ObjectStore(s3_url, upload_lease=3600).cleanup_stale()
    assert _garbage(s3_url, s3_server) == set()
    assert sorted(_check_all_whole(s3_url)) == sorted(ids)
    # the killed writers' local staging and mirrors (cfs-s3-<pid>-*) are gone too
    left = [n for n in os.listdir(tempfile.gettempdir()) if any(n.startswith(f"cfs-s3-{pid}-") for pid in pids)]
    assert left == []
    print(f"{len(ids)} checkpoints committed, {mid_upload}/10 kills left an unfinished upload")


def test_concurrent_writers_of_one_id_exactly_one_commits(s3_url, s3_server):
    """Four processes save the same checkpoint id with different states at once: the
    conditional PUT of the commit record lets exactly one commit; the others get
    CheckpointExistsError and leave no objects behind."""
    script = textwrap.dedent(
        """
        import sys, numpy as np
        from computable_flows_shim import CheckpointManager, CheckpointExistsError
        mgr = CheckpointManager(sys.argv[1])
        state = {"v": np.full(300_000, float(sys.argv[2]))}
        print("ready", flush=True)
        sys.stdin.readline()
        try:
            mgr.create_checkpoint("race", 1, state)
            print("committed")
        except CheckpointExistsError:
            print("exists")
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, s3_url, str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(results) == ["committed", "exists", "exists", "exists"], results
    winner = results.index("committed")
    mgr = CheckpointManager(s3_url)
    v = mgr.load_checkpoint("race-i000000000001")["state"]["v"]
    assert (v == winner).all()
    keys = s3_server.keys(_bucket(s3_url))
    rec = json.loads(bytes(mgr.store._get(".cfs-commits/race-i000000000001.json")))
    assert {k for k in keys if not k.startswith("ckpt/.cfs-commits/")} == {
        f"ckpt/{rec['data']}/{k}" for k in rec["objects"]
    }


def test_live_uploads_survive_cleanup_and_expired_ones_do_not(s3_url, s3_server):
    store = ObjectStore(s3_url, upload_lease=3600)
    # an upload in progress: marker and some objects, no record (what a killed writer leaves)
    store._put(
        ".cfs-uploads/r-i000000000001/" + "a" * 24 + ".json",
        json.dumps({"expires_at_unix": time.time() + 3600}).encode(),
    )
    store._put("r-i000000000001/" + "a" * 24 + "/state/zarr.json", b"{}")
    # an expired one, and data of a delete interrupted after its record went (no marker)
    store._put(
        ".cfs-uploads/r-i000000000002/" + "b" * 24 + ".json", json.dumps({"expires_at_unix": time.time() - 1}).encode()
    )
    store._put("r-i000000000002/" + "b" * 24 + "/state/zarr.json", b"{}")
    store._put("r-i000000000003/" + "c" * 24 + "/zarr.json", b"{}")
    assert store.cleanup_stale() == 2
    keys = s3_server.keys(_bucket(s3_url))
    assert keys == sorted(
        [
            "ckpt/.cfs-uploads/r-i000000000001/" + "a" * 24 + ".json",
            "ckpt/r-i000000000001/" + "a" * 24 + "/state/zarr.json",
        ]
    )
    assert CheckpointManager(s3_url).list_checkpoints() == []


def test_hostile_and_damaged_commit_records(s3_url, tmp_path):
    mgr = CheckpointManager(s3_url, pack_max_bytes=0)
    cid = mgr.create_checkpoint("r", 1, {"x": np.arange(1000.0)})
    store = mgr.store
    key = f".cfs-commits/{cid}.json"
    rec = json.loads(bytes(store._get(key)))

    original = bytes(store._get(f"{rec['data']}/state/x/c.0"))
    # an object changed after the commit (a stray writer): refused by the record's CRC
    store._put(f"{rec['data']}/state/x/c.0", b"\0" * (8000 + 4))
    with pytest.raises(CheckpointCorruptError, match="does not match the commit record"):
        CheckpointManager(s3_url).load_checkpoint(cid)
    report = CheckpointManager(s3_url).verify_checkpoint(cid)  # reported, not raised
    assert not report.ok and "does not match the commit record" in report.problems[0]
    # larger than recorded: refused from the response's size, before the body is read
    store._put(f"{rec['data']}/state/x/c.0", b"\0" * (1 << 20))
    with pytest.raises(CheckpointCorruptError, match="larger than the recorded 8004 bytes"):
        CheckpointManager(s3_url).load_checkpoint(cid)
    # a metadata object recorded as 1 GiB: refused before any GET
    huge = {**rec, "objects": {**rec["objects"], "state/zarr.json": [1 << 30, 0]}}
    store._put(key, json.dumps(huge).encode())
    with pytest.raises(CheckpointFormatError, match="metadata larger than"):
        CheckpointManager(s3_url).load_checkpoint(cid)

    # a record naming one key as an object and as a prefix (a file and a directory of the mirror)
    store._put(key, json.dumps({**rec, "objects": {**rec["objects"], "state/x/c.0/more": [1, 0]}}).encode())
    with pytest.raises(CheckpointFormatError, match="as an object and a prefix"):
        CheckpointManager(s3_url).load_checkpoint(cid)

    # a record whose keys would write outside the mirror: refused before any fetch
    bad = {**rec, "objects": {**rec["objects"], "../../../escape": [1, 0]}}
    store._put(key, json.dumps(bad).encode())
    with pytest.warns(Warning, match="not \\[size, crc32c\\]|commit record"):
        assert CheckpointManager(s3_url).list_checkpoints() == []
    with pytest.raises(CheckpointFormatError, match="escape"):
        CheckpointManager(s3_url).load_checkpoint(cid)
    assert not os.path.exists(os.path.join(os.path.dirname(store._cache), "escape"))

    # the chunk whole again, so that each bad record below is refused for itself, not for the chunk
    store._put(f"{rec['data']}/state/x/c.0", original)
    store._put(key, json.dumps(rec).encode())
    assert CheckpointManager(s3_url).load_checkpoint(cid)["state"]["x"].tobytes() == np.arange(1000.0).tobytes()
    for body, match in [
        (b"not json", "unreadable commit record"),
        (json.dumps({**rec, "checkpoint_id": "r-i000000000002"}).encode(), "not a commit record of checkpoint"),
        (b"[]", "not a commit record of checkpoint"),
    ]:
        store._put(key, body)
        with pytest.raises((CheckpointFormatError, CheckpointCorruptError), match=match):
            CheckpointManager(s3_url).load_checkpoint(cid)

    # a damaged record does not block the store: cleanup goes on, delete removes it
    store._put(f".cfs-uploads/{cid}/" + "d" * 24 + ".json", b'{"expires_at_unix": 0}')
    with pytest.warns(Warning, match="skipping"):
        assert ObjectStore(s3_url).cleanup_stale() == 1
    assert CheckpointManager(s3_url).delete_checkpoint(cid)
    assert not store.exists(cid)


def test_a_deleted_checkpoints_tags_are_not_inherited(s3_url):
    mgr = CheckpointManager(s3_url)
    cid = mgr.create_checkpoint("t", 1, {"x": np.arange(3.0)})
    mgr.tag_checkpoint(cid, "best")
    assert mgr.delete_checkpoint(cid)
    assert mgr.create_checkpoint("t", 1, {"x": np.arange(4.0)}) == cid
    assert mgr.tags(cid) == [] and mgr.tagged() == {}


def test_unreachable_store_is_a_clear_error():
    dead = f"http://127.0.0.1:{__import__('s3server').free_port()}"
    store = ObjectStore(
        "s3://nobucket/x",
        endpoint=dead,
        retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)},
    )
    with pytest.raises(StoreUnavailableError, match="nobucket"):
        CheckpointManager(store)


def test_missing_bucket_is_a_clear_error(s3_url):
    """A bucket that does not exist: listing and saving raise StoreUnavailableError naming it."""
    missing = "s3://cfs-no-such-bucket/x"
    with pytest.raises(StoreUnavailableError, match="cfs-no-such-bucket"):
        CheckpointManager(missing)
    store = ObjectStore(missing)
    with pytest.raises(StoreUnavailableError, match="cfs-no-such-bucket"):
        store.names()
    with pytest.raises(StoreUnavailableError, match="cfs-no-such-bucket"):
        with store.staging("r-i000000000001"):  # the upload marker's PUT
            pass


def test_bad_urls_are_refused():
    for url in ["s3://", "s3://A_Bad_Bucket/x", "gs://bucket/x"]:
        with pytest.raises(ValueError, match="s3://<bucket>/<prefix>"):
            ObjectStore(url)


def test_cli_runs_resumes_and_lists_on_s3(s3_url):
    """``cfs --store s3://...``: a flow runs with periodic checkpoints, resumes from the
    object store, and ls/du/verify/gc see it."""

    def cfs(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "computable_flows_shim", "--store", s3_url, *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    cfs("run", "deconv1d", "--run-id", "demo", "--iters", "300", "--checkpoint-every", "100", "--quiet")
    cfs("resume", "demo", "--iters", "400", "--quiet")
    listed = json.loads(cfs("ls", "--json"))
    assert [c["checkpoint_id"] for c in listed] == [f"demo-i000000000{i}00" for i in (4, 3, 2, 1)]
    assert "demo-i000000000400: OK" in cfs("verify", "demo-i000000000400")
    assert s3_url in cfs("du")
    cfs("gc", "demo", "--keep-last", "1")
    left = [c["checkpoint_id"] for c in json.loads(cfs("ls", "--json"))]
    assert "demo-i000000000400" in left and "demo-i000000000100" not in left


def _bytes_written_to_disk() -> int:
    """Bytes this process has dirtied in the page cache of a disk file system (/proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["write_bytes"])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts disk writes with /proc/self/io")
def test_a_save_streams_its_chunks_from_memory_into_puts(s3_url, s3_server):
    """No chunk is written to local disk on the way to the store (the kernel counts what this
    process writes; moto_server runs in another): only the metadata is.  The same save with
    the chunks staged locally, as before, shows that the count sees staging."""
    state = {"w": np.random.default_rng(3).standard_normal((4000, 1000))}  # 32 MB: 8 chunks
    mgr = CheckpointManager(s3_url)
    mgr.create_checkpoint("warm", 1, {"x": np.ones(3)})  # connections, caches
    written = []
    for run, staged in (("streamed", False), ("staged", True)):
        if staged:
            mgr.store.sink = lambda tmp: None  # the control: every file written into the staging area
        before = _bytes_written_to_disk()
        cid = mgr.create_checkpoint(run, 1, state)
        written.append(_bytes_written_to_disk() - before)
        assert mgr.store.last_upload["bytes_put"] >= state["w"].nbytes
        np.testing.assert_array_equal(CheckpointManager(s3_url).load_checkpoint(cid)["state"]["w"], state["w"])
    assert written[0] < 1 << 20 and written[1] >= state["w"].nbytes, written


def test_opening_a_checkpoint_fetches_its_metadata_many_at_once(s3_url, s3_server):
    """A fresh manager opening a 40-leaf checkpoint (lazily: no chunk read) through a proxy
    adding a round trip to every request fetches the leaves' zarr.json files many at once,
    not one round trip each (the proxy counts the requests it holds at the same time)."""
    from s3server import DroppingProxy

    state = {f"leaf{i:02d}": np.full(10, float(i)) for i in range(40)}
    mgr = CheckpointManager(s3_url, pack_max_bytes=0)  # a zarr.json per leaf
    cid = mgr.create_checkpoint("meta", 1, state)
    with DroppingProxy(s3_server.port, delay=0.05) as proxy:
        fresh = CheckpointManager(ObjectStore(s3_url, endpoint=proxy.endpoint))
        leaves = fresh.open_checkpoint(cid).state  # every leaf's metadata, no chunk
        assert proxy.max_in_flight >= 8, proxy.max_in_flight
        assert float(leaves["leaf39"][3]) == 39.0


def test_incremental_saves_copy_unchanged_chunks_server_side(s3_url, s3_server):
    """The run's next checkpoint copies (server-side) the chunks whose size, CRC32C and SHA-256
    equal its previous checkpoint's, and PUTs the rest; each checkpoint stands alone after the
    other is deleted."""
    rng = np.random.default_rng(5)
    frozen = rng.standard_normal((1500, 1000))  # 12 MB: three chunks, unchanged between saves
    mgr = CheckpointManager(s3_url)
    c1 = mgr.create_checkpoint("inc", 1, {"frozen": frozen, "x": np.zeros(1000)})
    first = dict(mgr.store.last_upload)
    c2 = mgr.create_checkpoint("inc", 2, {"frozen": frozen, "x": np.ones(1000)})
    second = dict(mgr.store.last_upload)
    assert first["objects_copied"] == 0
    assert second["objects_copied"] == 3 and second["bytes_copied"] == 3 * (524 * 1000 * 8 + 4)
    assert second["bytes_put"] < 64 << 10  # the changed leaf, telemetry and metadata only
    rec1, rec2 = (mgr.store._committed(c) for c in (c1, c2))
    assert (
        rec1["data"] != rec2["data"] and rec2["objects"]["state/frozen/c.0.0"] == rec1["objects"]["state/frozen/c.0.0"]
    )
    # a manager that did not make the previous checkpoint finds it by listing
    other = CheckpointManager(s3_url)
    other.create_checkpoint("inc", 3, {"frozen": frozen, "x": np.full(1000, 2.0)})
    assert other.store.last_upload["objects_copied"] == 3
    assert mgr.delete_checkpoint(c1)
    out = CheckpointManager(s3_url).load_checkpoint(c2)["state"]
    np.testing.assert_array_equal(out["frozen"], frozen)
    np.testing.assert_array_equal(out["x"], np.ones(1000))
    assert CheckpointManager(s3_url).verify_checkpoint(c2).ok


@pytest.mark.parametrize("retries", [0, 2])
def test_a_commit_record_put_whose_response_is_lost_counts_as_committed(s3_url, s3_server, retries):
    """The record's PUT lands but its response never arrives (a real proxy closes the
    connection): without retries the client sees a transport error, with retries its retry
    gets 412; either way the record read back names this upload, so the save succeeds and
    its objects stay (deleting them would leave a committed record naming nothing)."""
    from s3server import DroppingProxy

    def is_record_put(method: str, path: str) -> bool:
        return method == "PUT" and "/.cfs-commits/" in path

    def drop(method: str, path: str) -> bool:  # only the first response: a retry is answered
        return is_record_put(method, path) and proxy.dropped == 0

    with DroppingProxy(s3_server.port, drop) as proxy:
        store = ObjectStore(
            s3_url,
            endpoint=proxy.endpoint,
            retry_config={"max_retries": retries, "retry_timeout": timedelta(seconds=10)},
        )
        cid = CheckpointManager(store).create_checkpoint("lost", 1, {"x": np.arange(1000.0)})
    assert proxy.dropped == 1
    record_puts = [status for method, path, status in proxy.requests if is_record_put(method, path)]
    assert record_puts == ([200] if retries == 0 else [200, 412])  # the retry hit the landed record
    mgr = CheckpointManager(s3_url)
    np.testing.assert_array_equal(mgr.load_checkpoint(cid)["state"]["x"], np.arange(1000.0))
    assert mgr.verify_checkpoint(cid).ok


def test_reads_cost_a_bounded_number_of_requests(s3_url, s3_server, monkeypatch):
    """Each request is a round trip to the store: listing costs at most four per checkpoint
    (the existence check, the commit record, the record for its URL, the root metadata), and a
    load or a lazy slice locates its checkpoint once (one record GET, not one per helper)."""
    from s3server import FaultProxy

    mgr = CheckpointManager(s3_url)
    for i in range(10):
        mgr.create_checkpoint("r", i, {"x": np.arange(100.0), "y": np.ones(3, np.float32)})
    with FaultProxy(s3_server.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        m = CheckpointManager(s3_url)

        def cost(f) -> tuple[int, int]:
            n0 = len(proxy.requests)
            f()
            got = proxy.requests[n0:]
            return len(got), sum(1 for method, path, _ in got if ".cfs-commits/" in path and method == "GET")

        listed, _ = cost(lambda: m.list_checkpoints())
        assert listed <= 1 + 4 * 10, proxy.requests[-listed:]
        loaded, records = cost(lambda: m.load_checkpoint("r-i000000000003"))
        assert records == 1 and loaded <= 15, proxy.requests[-loaded:]
        sliced, records = cost(lambda: m.open_checkpoint("r-i000000000004").state["x"][:5])
        assert records == 1 and sliced <= 5, proxy.requests[-sliced:]
