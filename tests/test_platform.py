"""The platform seam (``_platform``): its choices, each fallback, and the whole manager on them.

The manager's whole surface (save, async save, incremental save, rollback, list, load, lazy
read, tags, verify, delete, retention, stale cleanup, the never-replace commit) runs in
subprocesses whose startup removes the Linux-only capabilities before the package is imported:
``fcntl`` (Windows has none), ``os.fdatasync`` and ``os.writev`` (macOS has no fdatasync,
Windows neither), and the C library's ``renameat2`` and ``syncfs`` (Linux only); one of them
stands in macOS's ``F_FULLFSYNC`` and ``renamex_np`` for them.  The real macOS and Windows
calls run only in the hosted-CI matrix (README, "Platforms").
"""

import ctypes
import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from computable_flows_shim import CheckpointManager, _platform
from computable_flows_shim._format.arrays import write_file

# ----------------------------------------------------------------------------- the choices

LINUX = ({"fdatasync", "writev"}, {"flock", "fcntl"}, {"renameat2", "syncfs"}, False)
MACOS = ({"writev"}, {"flock", "fcntl", "F_FULLFSYNC"}, {"renamex_np"}, False)
WINDOWS = ({"O_TEMPORARY", "O_BINARY"}, None, set(), True)
BARE_POSIX = ({"writev"}, None, set(), False)


@pytest.mark.parametrize(
    "offered, expected",
    [
        (LINUX, ("fdatasync", "fsync", "renameat2", "flock")),
        (MACOS, ("F_FULLFSYNC", "F_FULLFSYNC", "renamex_np", "flock")),
        (WINDOWS, ("FlushFileBuffers", "none", "MoveFileExW", "delete-on-close")),
        (BARE_POSIX, ("fsync", "fsync", "check-then-rename", "none")),
        # a macOS Python that has os.fdatasync: F_FULLFSYNC still wins (fdatasync stops at the drive's cache)
        (
            ({"fdatasync"}, {"flock", "F_FULLFSYNC"}, {"renamex_np"}, False),
            ("F_FULLFSYNC",) * 2 + ("renamex_np", "flock"),
        ),
        # glibc before 2.28: no renameat2
        (({"fdatasync"}, {"flock"}, set(), False), ("fdatasync", "fsync", "check-then-rename", "flock")),
        # a Windows without O_TEMPORARY (never seen): no lock rather than a wrong one
        ((set(), None, set(), True), ("FlushFileBuffers", "none", "MoveFileExW", "none")),
    ],
    ids=["linux", "macos", "windows", "bare-posix", "macos-with-fdatasync", "old-glibc", "windows-no-temporary"],
)
def test_choose_picks_by_capability(offered, expected):
    os_names, fcntl_names, libc_names, windows = offered
    got = _platform.choose(os_names, fcntl_names, libc_names, windows=windows)
    assert (got["data_sync"], got["dir_sync"], got["rename"], got["locking"]) == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="this machine's own choices, on Linux")
def test_this_linux_machine_uses_the_linux_calls():
    assert (_platform.DATA_SYNC, _platform.DIR_SYNC, _platform.RENAME, _platform.LOCKING) == (
        "fdatasync",
        "fsync",
        "renameat2",
        "flock",
    )
    assert _platform.HAVE_WRITEV


# ----------------------------------------------------------------------------- each fallback


def _c_call(result_errno):
    """A stand-in for a ctypes C function: -1 with ``errno`` set, or 0 after doing ``os.rename``."""
    calls = []

    def f(*args):
        calls.append(args)
        if result_errno:
            ctypes.set_errno(result_errno)
            return -1
        src, dst = [a for a in args if isinstance(a, bytes)]
        os.rename(src, dst)
        return 0

    f.calls = calls
    return f


def _dirs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"new")
    return str(src), str(dst)


@pytest.mark.parametrize("how", ["renameat2", "renamex_np"])
def test_c_renames_refuse_existing_targets_and_fall_back_where_unsupported(tmp_path, monkeypatch, how):
    src, dst = _dirs(tmp_path)
    monkeypatch.setattr(_platform, "RENAME", how)
    monkeypatch.setattr(_platform, "_renameat2", None)
    monkeypatch.setattr(_platform, "_renamex_np", None)
    # the kernel says the target exists: FileExistsError, nothing moved
    monkeypatch.setattr(_platform, f"_{how}", _c_call(errno.EEXIST))
    with pytest.raises(FileExistsError):
        _platform.rename_noreplace(src, dst)
    assert os.path.isdir(src) and not os.path.exists(dst)
    # an I/O error is raised as it is, never retried another way
    monkeypatch.setattr(_platform, f"_{how}", _c_call(errno.EIO))
    with pytest.raises(OSError) as e:
        _platform.rename_noreplace(src, dst)
    assert e.value.errno == errno.EIO and os.path.isdir(src)
    # a file system that does not implement it: check, then rename(2)
    for unsupported in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        monkeypatch.setattr(_platform, f"_{how}", _c_call(unsupported))
        os.makedirs(dst)
        (tmp_path / "dst" / "old").write_bytes(b"committed")
        with pytest.raises(FileExistsError):
            _platform.rename_noreplace(src, dst)
        assert (tmp_path / "dst" / "old").read_bytes() == b"committed"
        os.remove(tmp_path / "dst" / "old")
        os.rmdir(dst)
    monkeypatch.setattr(_platform, f"_{how}", _c_call(errno.ENOSYS))
    _platform.rename_noreplace(src, dst)
    assert (tmp_path / "dst" / "f").read_bytes() == b"new"
    # and the call itself, where it works
    fn = _c_call(0)
    monkeypatch.setattr(_platform, f"_{how}", fn)
    _platform.rename_noreplace(dst, src)
    assert len(fn.calls) == 1 and (tmp_path / "src" / "f").read_bytes() == b"new"
    if how == "renamex_np":
        assert fn.calls[0][2] == 0x4  # RENAME_EXCL
    else:
        assert fn.calls[0][4] == 1  # RENAME_NOREPLACE


def test_check_then_rename_never_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(_platform, "RENAME", "check-then-rename")
    src, dst = _dirs(tmp_path)
    (tmp_path / "dst").write_bytes(b"a file")
    with pytest.raises(FileExistsError):
        _platform.rename_noreplace(src, dst)
    os.remove(dst)
    os.symlink(tmp_path / "nowhere", dst)  # a dangling symlink exists too
    with pytest.raises(FileExistsError):
        _platform.rename_noreplace(src, dst)
    os.remove(dst)
    _platform.rename_noreplace(src, dst)
    assert os.listdir(dst) == ["f"] and not os.path.exists(src)


class _FakeFcntl:
    """An ``fcntl`` whose ``F_FULLFSYNC`` answers ``errno`` (0: works)."""

    F_FULLFSYNC = 51

    def __init__(self, err):
        self.err, self.calls = err, []

    def fcntl(self, fd, cmd):
        self.calls.append(cmd)
        if self.err:
            raise OSError(self.err, os.strerror(self.err))
        return 0


@pytest.mark.parametrize("err, fsyncs", [(0, 0), (errno.ENOTSUP, 1), (errno.EINVAL, 1), (errno.EIO, None)])
def test_full_fsync_falls_back_to_fsync_only_where_unsupported(tmp_path, monkeypatch, err, fsyncs):
    fake = _FakeFcntl(err)
    monkeypatch.setattr(_platform, "_fcntl", fake)
    monkeypatch.setattr(_platform, "_SYNC_DATA", _platform._full_fsync)
    monkeypatch.setattr(_platform, "DIR_SYNC", "F_FULLFSYNC")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    try:
        if fsyncs is None:  # a real failure raises: no quieter sync instead
            with pytest.raises(OSError):
                _platform.sync_data(fd)
            with pytest.raises(OSError):
                _platform.sync_dir(str(tmp_path))
            assert synced == []
        else:
            _platform.sync_data(fd)
            _platform.sync_dir(str(tmp_path))
            assert len(synced) == 2 * fsyncs
        assert fake.calls == [51, 51]
    finally:
        os.close(fd)


def test_no_directory_sync_opens_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(_platform, "DIR_SYNC", "none")
    monkeypatch.setattr(os, "open", lambda *a, **k: pytest.fail("a directory was opened"))
    _platform.sync_dir(str(tmp_path))


def test_without_writev_every_buffer_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(_platform, "HAVE_WRITEV", False)
    monkeypatch.setattr(os, "writev", lambda *a: pytest.fail("os.writev called"), raising=False)
    bufs = [b"head", np.arange(1000, dtype=np.float64).data, b"", bytes(range(256)) * 3]
    write_file(str(tmp_path / "c"), bufs, durable=True)
    assert (tmp_path / "c").read_bytes() == b"".join(bytes(memoryview(b).cast("B")) for b in bufs)


@pytest.mark.skipif(_platform.LOCKING != "flock", reason="flock semantics")
def test_flock_lock_files(tmp_path):
    lock = str(tmp_path / "t.lock")
    held = _platform.create_lock(lock)
    with pytest.raises(FileExistsError):
        _platform.create_lock(lock)  # never an existing one
    assert _platform.claim_lock(lock) is None  # a live holder
    os.close(held)
    fd = _platform.claim_lock(lock)
    assert fd is not None and fd >= 0
    assert _platform.claim_lock(lock) is None  # now the claimer holds it
    _platform.unlink_lock(lock)
    _platform.unlink_lock(lock)  # gone already: fine
    os.close(fd)
    with pytest.raises(FileNotFoundError):
        _platform.claim_lock(lock)


def test_without_locks_nothing_is_ever_claimed(tmp_path, monkeypatch):
    monkeypatch.setattr(_platform, "LOCKING", "none")
    lock = str(tmp_path / "t.lock")
    fd = _platform.create_lock(lock)
    os.close(fd)  # even with nobody holding anything, it cannot tell: never claimed
    assert _platform.claim_lock(lock) is None
    os.remove(lock)
    with pytest.raises(FileNotFoundError):
        _platform.claim_lock(lock)


def test_pid_alive():
    assert _platform.pid_alive(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not _platform.pid_alive(p.pid)


def test_reading_takes_no_lock(tmp_path, monkeypatch):
    """Load, list, lazy reads, verify, tags and disk usage never create or take a lock."""
    mgr = CheckpointManager(tmp_path / "store")
    cid = mgr.create_checkpoint("r", 1, {"x": np.arange(100.0)}, {})
    mgr.tag_checkpoint(cid, "best")

    def no_lock(*a, **k):
        pytest.fail("a read took a lock")

    for name in ("create_lock", "claim_lock", "unlink_lock"):
        monkeypatch.setattr(_platform, name, no_lock)
    if _platform._fcntl is not None:
        monkeypatch.setattr(_platform._fcntl, "flock", no_lock)
        monkeypatch.setattr(_platform._fcntl, "lockf", no_lock)
    assert [i.checkpoint_id for i in mgr.list_checkpoints()] == [cid]
    assert mgr.load_checkpoint(cid)["state"]["x"][7] == 7.0
    assert mgr.open_checkpoint(cid).state["x"][10:12].tolist() == [10.0, 11.0]
    assert mgr.verify_checkpoint(cid).ok
    assert mgr.tags(cid) == ["best"] and mgr.get_latest_checkpoint("r") == cid
    mgr.disk_usage()


# ----------------------------------------------------------------------------- the whole manager without Linux

_STARTUP = r"""
import ctypes, json, os, sys
variant, root = sys.argv[1], sys.argv[2]
removed = {"renameat2", "syncfs", "renamex_np"}
real_renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
calls = {"F_FULLFSYNC": 0, "renamex_np": 0, "fsync": 0, "flock": 0}

if variant == "macos":
    import fcntl
    real_fcntl = fcntl.fcntl
    fcntl.F_FULLFSYNC = 51  # macOS's value; Linux has no such command, so it is answered here

    def fake_fcntl(fd, cmd, *arg):
        if cmd == 51:
            calls["F_FULLFSYNC"] += 1
            os.fsync(fd)
            return 0
        return real_fcntl(fd, cmd, *arg)

    fcntl.fcntl = fake_fcntl

    class RenamexNp:  # macOS renamex_np(from, to, RENAME_EXCL), done by Linux's RENAME_NOREPLACE
        argtypes = restype = None

        def __call__(self, src, dst, flags):
            assert flags == 0x4, flags
            calls["renamex_np"] += 1
            return real_renameat2(-100, src, -100, dst, 1)

    removed.discard("renamex_np")
else:
    sys.modules["fcntl"] = None  # import fcntl raises ImportError, as on Windows
    del os.writev  # Windows has none

del os.fdatasync  # macOS and Windows have none
real_getitem = ctypes.CDLL.__getitem__


def getitem(self, name):
    if name in removed:
        raise AttributeError(f"undefined symbol: {name}")
    if name == "renamex_np":
        return RenamexNp()
    return real_getitem(self, name)


ctypes.CDLL.__getitem__ = getitem
real_fsync = os.fsync


def counting_fsync(fd):
    calls["fsync"] += 1
    return real_fsync(fd)


os.fsync = counting_fsync
"""

_SURFACE = r"""
import numpy as np
from computable_flows_shim import CheckpointExistsError, CheckpointManager, KeepLatest, _platform
from computable_flows_shim._format import io as _io, writer

chosen = [_platform.DATA_SYNC, _platform.DIR_SYNC, _platform.RENAME, _platform.LOCKING]
out = {"chosen": chosen, "syncfs": _platform.HAVE_SYNCFS and writer.HAVE_SYNCFS, "writev": _platform.HAVE_WRITEV}
if _platform.LOCKING == "flock":
    import fcntl
    real_flock = fcntl.flock

    def counting_flock(fd, op):
        calls["flock"] += 1
        return real_flock(fd, op)

    fcntl.flock = counting_flock

rng = np.random.default_rng(0)


def state(i, big):
    h = np.linspace(0, i, 3, dtype=np.float16)
    return {"w": big, "b": np.arange(5, dtype=np.int64) + i, "s": np.float32(i), "h": h}


big = rng.standard_normal((300, 1000)).astype(np.float32)  # several chunks: the incremental save links them
mgr = CheckpointManager(root)
saved = {}
c1 = mgr.create_checkpoint("run", 1, state(1, big), {"lr": 0.1}, telemetry_history={"iter": [0, 1], "E": [2.0, 1.0]})
saved[c1] = state(1, big)
c2 = mgr.create_checkpoint("run", 2, state(2, big), {"lr": 0.1}, blocking=False)  # async
saved[c2] = state(2, big)
mgr.wait_until_finished()
linked = mgr.last_save_stats.chunks_linked  # incremental: the unchanged chunks of w
c3 = mgr.create_checkpoint("run", 3, state(3, big * 2), {"lr": 0.1})
saved[c3] = state(3, big * 2)
branch = mgr.rollback_to_checkpoint(c2, "branch")  # hard links of every file, a new root
out["linked"] = linked
try:
    mgr.create_checkpoint("run", 2, state(9, big), {})
    out["replaced"] = True
except CheckpointExistsError:
    out["replaced"] = False
with mgr.store.staging(c3) as (tmp, commit):  # past the manager's check: the commit's rename itself
    os.mkdir(os.path.join(tmp, "x"))
    try:
        commit()
        out["rename_refused"] = False
    except CheckpointExistsError:
        out["rename_refused"] = True
out["listed"] = [i.checkpoint_id for i in mgr.list_checkpoints()]
exact = []
for cid, s in saved.items():
    got = mgr.load_checkpoint(cid)["state"]
    exact.append(all(np.asarray(got[k]).tobytes() == np.asarray(v).tobytes() for k, v in s.items()))
got = mgr.load_checkpoint(branch)
exact.append(got["state"]["b"].tolist() == [2, 3, 4, 5, 6] and got["lineage"]["rollback_from"] == c2)
view = mgr.open_checkpoint(c3)
exact.append(view.state["w"][17:19, 3:9].tobytes() == (big * 2)[17:19, 3:9].tobytes())
out["exact"] = exact
out["verified"] = [bool(mgr.verify_checkpoint(c)) for c in (c1, c2, c3, branch)]
out["tagged"] = mgr.tag_checkpoint(c1, "keep")
out["deleted"] = mgr.delete_checkpoint(c2)
out["retention"] = sorted(mgr.apply_retention("run", KeepLatest(1)).deleted)  # c1 is tagged: kept
out["after"] = sorted(i.checkpoint_id for i in mgr.list_checkpoints())
# stale cleanup: a dead writer's staging directory with its lock file, and one without
staging = os.path.join(root, ".cfs-staging")
for token in ("run-i000000000009.1.aaaaaaaaaaaa", "run-i000000000009.2.bbbbbbbbbbbb"):
    os.makedirs(os.path.join(staging, token))
open(os.path.join(staging, "run-i000000000009.1.aaaaaaaaaaaa.lock"), "w").close()
mgr.store.cleanup_stale()
out["staging_left"] = sorted(os.listdir(staging))
mgr.close()
out["calls"] = calls
print("RESULT " + json.dumps(out))
"""


def _run(variant, root):
    script = _STARTUP + textwrap.dedent(_SURFACE)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [sys.executable, "-c", script, variant, str(root)], capture_output=True, text=True, timeout=300, env=env
    )
    assert p.returncode == 0, p.stderr[-4000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(line[-1][len("RESULT ") :])


def _check_surface(out):
    assert out["linked"] > 0, "the incremental save linked nothing"
    assert out["replaced"] is False and out["rename_refused"] is True
    assert out["listed"] == ["branch-i000000000002", "run-i000000000003", "run-i000000000002", "run-i000000000001"]
    assert out["exact"] == [True] * 5
    assert out["verified"] == [True] * 4
    assert out["tagged"] is True and out["deleted"] is True
    assert out["retention"] == []  # c1 tagged, c2 deleted already, c3 newest
    assert out["after"] == ["branch-i000000000002", "run-i000000000001", "run-i000000000003"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="removes Linux's calls: meaningful on Linux only")
def test_whole_manager_without_fcntl_fdatasync_renameat2_syncfs_writev(tmp_path):
    """Windows' and bare POSIX's fallbacks: per-file ``fsync``, check-then-rename, no locks, one
    ``write`` at a time.  Without a lock stale cleanup cannot tell a dead writer from a live one:
    it removes the staging directory without a lock file only."""
    out = _run("bare", tmp_path / "store")
    assert out["chosen"] == ["fsync", "fsync", "check-then-rename", "none"]
    assert out["syncfs"] is False and out["writev"] is False
    _check_surface(out)
    assert out["calls"]["fsync"] > 20  # every file and directory synced, one by one
    assert out["calls"]["flock"] == 0
    assert out["staging_left"] == ["run-i000000000009.1.aaaaaaaaaaaa", "run-i000000000009.1.aaaaaaaaaaaa.lock"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stands macOS's calls in for Linux's")
def test_whole_manager_on_macos_calls(tmp_path):
    """macOS's choices: ``F_FULLFSYNC`` for files and directories, ``renamex_np(RENAME_EXCL)``
    for the commit, ``flock`` (both stood in for on Linux, see ``_STARTUP``)."""
    out = _run("macos", tmp_path / "store")
    assert out["chosen"] == ["F_FULLFSYNC", "F_FULLFSYNC", "renamex_np", "flock"]
    assert out["syncfs"] is False and out["writev"] is True
    _check_surface(out)
    assert out["calls"]["F_FULLFSYNC"] > 20 and out["calls"]["F_FULLFSYNC"] == out["calls"]["fsync"]
    assert out["calls"]["renamex_np"] == 5  # 4 commits and the refused one
    assert out["calls"]["flock"] > 0
    assert out["staging_left"] == []  # flock tells a dead writer: both removed
