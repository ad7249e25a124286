"""Multi-process saves with real processes: ``jax.distributed.initialize`` on localhost, 2 to 4
processes of 2 CPU devices each, one global array over a global mesh.  Every process writes its
own shards into one staging directory; process 0 commits once, after a barrier with a timeout.

What JAX's coordination service does when a peer dies (jax 0.10.2, observed here, see
``test_killed_process_means_no_commit``): a SIGKILLed process is only noticed through its
missing heartbeats; after ``heartbeat_timeout_seconds`` the service marks it failed and then
terminates every other process (``Terminating process because the JAX distributed service
detected fatal errors``, SIGABRT), and a process exiting normally afterwards aborts in its
shutdown barrier.  So the save's ``distributed_timeout`` (here 4 s) is kept below the heartbeat
timeout (here 30 s): the survivors raise our DistributedSaveError first, and the scripts leave
with ``os._exit`` (no JAX shutdown barrier with a dead peer).  When process 0, which hosts the
coordination service, is killed, the others are terminated at once by JAX (UNAVAILABLE, "Failed
to send RPC to coordination service"): no Python error can surface there, no commit happens, and
the staging directory (its lock released) is removed by the next stale cleanup.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from s3server import free_port

from computable_flows_shim import CheckpointManager

W = np.arange(96 * 512, dtype=np.float32).reshape(96, 512)
V = (np.arange(16 * 8, dtype=np.int32).reshape(16, 8) * 7) % 251

PRELUDE = """
import os, sys, time, json
pid, n, port, store, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
local = int(os.environ.get("CFS_LOCAL_DEVICES", "2"))
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local}"
import jax, numpy as np
jax.distributed.initialize(f"localhost:{port}", n, pid, initialization_timeout=60,
                           heartbeat_timeout_seconds=30,
                           shutdown_timeout_seconds=int(os.environ.get("CFS_SHUTDOWN_TIMEOUT", "5")))
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from computable_flows_shim import CheckpointManager, DistributedSaveError
assert jax.process_count() == n and len(jax.local_devices()) == local
devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))).reshape(n, local)
mesh = Mesh(devices, ("p", "d"))
W = np.arange(96 * 512, dtype=np.float32).reshape(96, 512)
V = (np.arange(16 * 8, dtype=np.int32).reshape(16, 8) * 7) % 251
def say(*a):
    print(*a, flush=True)
"""

SAVE = (
    PRELUDE
    + """
w = jax.make_array_from_callback(W.shape, NamedSharding(mesh, P(("p", "d"))), lambda i: W[i])
v = jax.make_array_from_callback(V.shape, NamedSharding(mesh, P(None, "d")), lambda i: V[i])  # replicated over "p"
state = {"w": w, "v": v, "step": 7, "host": np.arange(5.0)}
victim = int(os.environ.get("CFS_VICTIM", "-1"))
if pid == victim and mode == "kill":  # stop at the commit barrier, after writing its shards
    import computable_flows_shim.checkpoints._distributed as D
    def stop(client, name, timeout, what):
        if name.endswith("/written"):
            say("WRITTEN")
            time.sleep(600)
    D._barrier = stop
if pid == victim and mode == "raise":
    state["bad"] = object()  # UnsupportedLeafError inside the save, before writing anything
if pid == victim and mode == "exit":
    raise SystemExit("process leaves before saving")
mgr = CheckpointManager(store, compression=os.environ.get("CFS_COMPRESSION") or None)
t0 = time.monotonic()
try:
    cid = mgr.create_checkpoint("mp", 3, state, {"lr": 0.1}, {"E": [1.0, 0.5]},
                                distributed_timeout=float(os.environ.get("CFS_TIMEOUT", "300")))
except DistributedSaveError as e:
    say("DISTRIBUTED-ERROR", round(time.monotonic() - t0, 2), str(e))
    if pid == 0:
        time.sleep(1.5)  # keep the coordination service up while the others report
    os._exit(3)
except Exception as e:
    say("OWN-ERROR", round(time.monotonic() - t0, 2), type(e).__name__, str(e))
    if pid == 0:
        time.sleep(1.5)
    os._exit(4)
say("SAVED", cid, round(time.monotonic() - t0, 2), mgr.last_save_stats.chunks_written)
"""
)

RESTORE_MP = (
    PRELUDE
    + """
flat = mesh.devices.reshape(-1)
m1 = Mesh(flat, ("x",))
target = {"w": jax.ShapeDtypeStruct(W.shape, W.dtype, sharding=NamedSharding(m1, P(None, "x"))),
          "v": jax.ShapeDtypeStruct(V.shape, V.dtype, sharding=NamedSharding(m1, P("x"))),
          "step": 0, "host": np.zeros(5)}
out = CheckpointManager(store).load_checkpoint(mode, target=target)["state"]
for name, ref in (("w", W), ("v", V)):
    for s in out[name].addressable_shards:
        assert np.array_equal(np.asarray(s.data), ref[s.index]), (name, s.index)
assert out["step"] == 7 and np.array_equal(out["host"], np.arange(5.0))
say("RESTORED", len(out["w"].addressable_shards))
"""
)

RESTORE_1 = """
import os, sys
n = int(sys.argv[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from computable_flows_shim import CheckpointManager
mesh = Mesh(np.array(jax.devices()), ("x",))
W = np.arange(96 * 512, dtype=np.float32).reshape(96, 512)
V = (np.arange(16 * 8, dtype=np.int32).reshape(16, 8) * 7) % 251
target = {"w": jax.ShapeDtypeStruct(W.shape, W.dtype, sharding=NamedSharding(mesh, P("x"))),
          "v": jax.ShapeDtypeStruct(V.shape, V.dtype, sharding=NamedSharding(mesh, P(None, "x"))),
          "step": 0, "host": np.zeros(5)}
out = CheckpointManager(sys.argv[1]).load_checkpoint(sys.argv[3], target=target)["state"]
assert len(out["w"].addressable_shards) == n
assert np.array_equal(np.asarray(out["w"]), W) and np.array_equal(np.asarray(out["v"]), V)
print("OK", n)
"""


def _env(local_devices=2, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) and not k.startswith("CFS_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", CFS_LOCAL_DEVICES=str(local_devices))
    env.update({k: str(v) for k, v in extra.items()})
    return env


_LIVE: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _kill_leftovers():
    """A failing test must not leave its processes running."""
    yield
    while _LIVE:
        p = _LIVE.pop()
        if p.poll() is None:
            p.kill()
        p.communicate()


def launch(code, n, store, mode, local_devices=2, **extra):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(i), str(n), str(port), str(store), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(local_devices, **extra),
        )
        for i in range(n)
    ]
    _LIVE.extend(procs)
    return procs


def finish(procs, timeout=120):
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out, err))
    return outs


def lines(out, tag):
    return [line.split(" ", 1)[1] if " " in line else "" for line in out.splitlines() if line.startswith(tag)]


def _save(tmp_path, n):
    store = tmp_path / "store"
    outs = finish(launch(SAVE, n, store, "ok"))
    for rc, out, err in outs:
        assert rc == 0 and lines(out, "SAVED"), err[-3000:]
    cids = {lines(out, "SAVED")[0].split()[0] for _, out, _ in outs}
    assert cids == {"mp-i000000000003"}
    return store, cids.pop(), outs


def _check_committed(store, cid):
    mgr = CheckpointManager(store)
    assert [i.checkpoint_id for i in mgr.list_checkpoints()] == [cid]
    assert mgr.verify_checkpoint(cid).problems == []
    out = mgr.load_checkpoint(cid)
    np.testing.assert_array_equal(out["state"]["w"], W)
    np.testing.assert_array_equal(out["state"]["v"], V)
    assert out["state"]["w"].dtype == np.float32 and out["state"]["v"].dtype == np.int32
    assert out["state"]["step"] == 7 and list(out["state"]["host"]) == [0, 1, 2, 3, 4]
    assert out["flow_config"] == {"lr": 0.1} and list(out["telemetry"]["E"]) == [1.0, 0.5]
    assert not os.listdir(store / ".cfs-staging")
    return mgr


@pytest.mark.parametrize("n", [2, 4])
def test_processes_save_one_checkpoint_that_restores_anywhere(tmp_path, n):
    """n processes x 2 devices save; the chunk grid is the shard blocks (each process wrote its
    own); it verifies and loads bit-exactly in this process (numpy), in one process with 1 and 4
    devices, and in another process count (4 processes x 1 device after 2, 2 x 2 after 4)."""
    store, cid, outs = _save(tmp_path, n)
    mgr = _check_committed(store, cid)
    view = mgr.open_checkpoint(cid)
    assert view.state["w"].chunk_shape == (96 // (2 * n), 512)  # one block per device
    assert view.state["v"].chunk_shape == (16, 4)  # blocks of P(None, "d"), replicated over processes
    written = [int(lines(out, "SAVED")[0].split()[2]) for _, out, _ in outs]
    assert all(c > 0 for c in written)  # every process wrote chunks of its own (its stats)
    for devices in [1, 4] if n == 2 else [1]:
        r = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(RESTORE_1), str(store), str(devices), cid],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )
        assert r.returncode == 0 and f"OK {devices}" in r.stdout, r.stderr[-3000:]
    other, local = (4, 1) if n == 2 else (2, 2)
    outs = finish(launch(RESTORE_MP, other, store, cid, local_devices=local))
    for rc, out, err in outs:
        assert rc == 0 and lines(out, "RESTORED") == [str(local)], err[-3000:]


def test_processes_save_one_compressed_checkpoint(tmp_path):
    """With compression, arrays spread over processes are compressed as asked (their chunks come
    from several processes: one codec, no switch-off); it verifies and loads bit-exactly."""
    import json

    store = tmp_path / "store"
    outs = finish(launch(SAVE, 2, store, "ok", CFS_COMPRESSION="zstd"))
    for rc, out, err in outs:
        assert rc == 0 and lines(out, "SAVED"), err[-3000:]
    cid = "mp-i000000000003"
    _check_committed(store, cid)
    codecs = {}
    for leaf in ("w", "v"):
        with open(store / cid / "state" / leaf / "zarr.json") as f:
            codecs[leaf] = [c["name"] for c in json.load(f)["codecs"]]
    assert codecs["w"] == codecs["v"] == ["bytes", "zstd", "crc32c"]
    with open(store / cid / "zarr.json") as f:
        assert json.load(f)["attributes"]["format_version"] == 2


def _no_trace(store):
    mgr = CheckpointManager(store)  # stale cleanup
    assert mgr.list_checkpoints() == []
    assert os.listdir(store / ".cfs-staging") == []
    assert [e for e in os.listdir(store) if not e.startswith(".")] == []


def test_killed_process_means_no_commit(tmp_path):
    """Process 1 of 3 is SIGKILLed once it has written its shards (it says so, then waits at
    the commit barrier): processes 0 and 2 raise DistributedSaveError at the barrier, within
    the 4 s timeout; process 0 removed the staging directory, nothing is listed."""
    store = tmp_path / "store"
    procs = launch(SAVE, 3, store, "kill", CFS_VICTIM=1, CFS_TIMEOUT=4)
    victim = procs[1]
    assert victim.stdout is not None
    line = victim.stdout.readline()  # blocks until it has written its shards
    assert line.strip() == "WRITTEN", victim.communicate(timeout=60)
    staged = {f for b, _, fs in os.walk(store / ".cfs-staging") for f in fs if b.endswith("/state/w")}
    assert {"c.2.0", "c.3.0"} <= staged  # its own blocks (devices 2 and 3), in the one staging directory
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    outs = finish(procs)
    assert outs[1][0] == -signal.SIGKILL
    for i in (0, 2):
        rc, out, err = outs[i]
        assert rc == 3, (out, err[-2000:])
        (msg,) = lines(out, "DISTRIBUTED-ERROR")
        elapsed, text = msg.split(" ", 1)
        assert float(elapsed) < 4 + 3 and "barrier" in text and "within 4 s" in text
    assert time.monotonic() - killed_at < 4 + 10
    assert os.listdir(store / ".cfs-staging") == []  # removed by process 0 itself
    _no_trace(store)


def test_killed_coordinator_is_cleaned_up_by_stale_cleanup(tmp_path):
    """Process 0 (the coordination service) SIGKILLed after writing: JAX terminates processes 1
    and 2 at once (SIGABRT, no Python error can be raised); nothing is committed, and the
    staging directory left behind (its lock no longer held) is removed by stale cleanup."""
    store = tmp_path / "store"
    procs = launch(SAVE, 3, store, "kill", CFS_VICTIM=0, CFS_TIMEOUT=4)
    assert procs[0].stdout is not None
    assert procs[0].stdout.readline().strip() == "WRITTEN"
    procs[0].send_signal(signal.SIGKILL)
    outs = finish(procs)
    for rc, out, err in outs[1:]:
        assert rc == -signal.SIGABRT or rc == 3, (rc, out, err[-2000:])
        assert rc == 3 or "coordination service" in err
    assert len(os.listdir(store / ".cfs-staging")) == 2  # <token> and <token>.lock, left behind
    _no_trace(store)


@pytest.mark.parametrize("mode", ["raise", "exit"])
def test_failing_process_means_no_commit(tmp_path, mode):
    """``raise``: process 1's save raises (an unsupported leaf) before writing: it tells process
    0 and re-raises its own error; process 0 commits nothing and raises DistributedSaveError
    naming process 1, at once (no timeout to wait).  ``exit``: process 1 leaves before calling
    the save: process 0 raises at the commit barrier, within the 4 s timeout.  Observed: process
    1's normal exit runs JAX's shutdown barrier, which fails after its shutdown timeout, and then
    the coordination service terminates process 0 (SIGABRT); with a 5 s shutdown timeout that
    abort came first on a loaded 2-core CI machine, so this test gives it 30 s."""
    store = tmp_path / "store"
    t0 = time.monotonic()
    outs = finish(launch(SAVE, 2, store, mode, CFS_VICTIM=1, CFS_TIMEOUT=4, CFS_SHUTDOWN_TIMEOUT=30))
    rc, out, err = outs[0]
    assert rc == 3, (out, err[-2000:])
    (msg,) = lines(out, "DISTRIBUTED-ERROR")
    elapsed, text = msg.split(" ", 1)
    if mode == "raise":
        assert "process 1: UnsupportedLeafError" in text and float(elapsed) < 3, msg
        assert lines(outs[1][1], "OWN-ERROR")[0].split()[1] == "UnsupportedLeafError"
    else:
        assert "barrier" in text and float(elapsed) < 4 + 3, msg
    assert time.monotonic() - t0 < 60
    _no_trace(store)


def test_processes_save_one_checkpoint_to_an_object_store(s3_url, s3_server):
    """The same save on an s3:// store (moto_server on loopback): process 0 opens the upload
    (its marker), every process PUTs its own shards' chunks under the upload's token and
    reports them, process 0 creates the commit record naming every object; it verifies and
    restores onto 1 and 4 devices in one process."""
    outs = finish(launch(SAVE, 2, s3_url, "ok"))
    for rc, out, err in outs:
        assert rc == 0 and lines(out, "SAVED"), err[-3000:]
    cid = "mp-i000000000003"
    mgr = CheckpointManager(s3_url)
    assert [i.checkpoint_id for i in mgr.list_checkpoints()] == [cid]
    assert mgr.verify_checkpoint(cid).problems == []
    np.testing.assert_array_equal(mgr.load_checkpoint(cid)["state"]["w"], W)
    rec = mgr.store._committed(cid)
    assert {f"state/w/c.{i}.0" for i in range(4)} <= set(rec["objects"])  # process 1 wrote c.2.0 and c.3.0
    keys = s3_server.keys(s3_url.split("/")[2])
    assert not [k for k in keys if ".cfs-uploads" in k]
    assert {k for k in keys if "/.cfs-commits/" not in k} == {f"ckpt/{rec['data']}/{k}" for k in rec["objects"]}
    for devices in [1, 4]:
        r = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(RESTORE_1), s3_url, str(devices), cid],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
        )
        assert r.returncode == 0 and f"OK {devices}" in r.stdout, r.stderr[-3000:]


def test_killed_process_means_no_commit_on_an_object_store(s3_url, s3_server):
    """Process 1 of 2 SIGKILLed after PUTting its shards: process 0 raises at the barrier,
    commits nothing, and deletes the whole upload (process 1's objects too) and its marker."""
    procs = launch(SAVE, 2, s3_url, "kill", CFS_VICTIM=1, CFS_TIMEOUT=4)
    assert procs[1].stdout is not None
    assert procs[1].stdout.readline().strip() == "WRITTEN"
    bucket = s3_url.split("/")[2]
    assert [k for k in s3_server.keys(bucket) if "/state/w/c." in k]  # its chunks are uploaded
    procs[1].send_signal(signal.SIGKILL)
    outs = finish(procs)
    rc, out, err = outs[0]
    assert rc == 3 and "barrier" in lines(out, "DISTRIBUTED-ERROR")[0], (out, err[-2000:])
    assert s3_server.keys(bucket) == []
    assert CheckpointManager(s3_url).list_checkpoints() == []
