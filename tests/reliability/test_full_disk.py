"""Scenario 4 (issue 5): a real full disk.

A size-limited tmpfs (8 MiB; and one with few inodes) is mounted for the test (we run as
root in CI; the test is skipped, saying why, where mounting is impossible).  The disk is
filled to different levels, from no free byte to more than a checkpoint needs, before
each save.  Every save either commits a checkpoint that loads bit for bit, or raises
``CheckpointWriteError`` caused by the kernel's ENOSPC, commits nothing, and leaves the
disk usage (bytes and inodes) exactly where it was before the save.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from computable_flows_shim import CheckpointManager, CheckpointWriteError

from ._harness import make_save_args
from .conftest import add, assert_checkpoint_is, staging_entries

FIG = "4. real full disk (size-limited tmpfs)"


@pytest.fixture
def tmpfs(tmp_path, request):
    def mount(options: str) -> str:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a size-limited tmpfs needs root (CAP_SYS_ADMIN); the full-disk test did not run")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the full-disk test did not run")
        mounted.append(str(d))
        return str(d)

    mounted: list[str] = []
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", d], check=False)


def usage(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree


def fill_to(disk: str, free_bytes: int, name: str = "filler") -> None:
    """Leave about ``free_bytes`` free (the filler is one preallocated file)."""
    path = os.path.join(disk, name)
    if os.path.exists(path):
        os.unlink(path)
    st = os.statvfs(disk)
    n = st.f_bavail * st.f_frsize - free_bytes
    if n > 0:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, n)
        finally:
            os.close(fd)


def attempt(mgr, disk, run, it, shape, counts, blocking=True) -> bool:
    """One save on a nearly full disk; checks whichever way it goes; True if it committed."""
    store = mgr.store.root
    before = usage(disk)
    names = set(mgr.store.names())
    args = make_save_args(shape, it)
    try:
        cid = mgr.create_checkpoint(run, it, blocking=blocking, **args)
        mgr.wait_until_finished()
    except CheckpointWriteError as e:
        assert isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC, repr(e.__cause__)
        assert repr(f"{run}-i{it:012d}") in str(e)
        assert set(mgr.store.names()) == names, "a failed save left a visible checkpoint"
        assert staging_entries(store) == [], "a failed save left its temporary"
        assert usage(disk) == before, f"disk usage {usage(disk)} did not return to {before}"
        counts["saves refused with ENOSPC, usage restored exactly"] += 1
        return False
    assert_checkpoint_is(mgr, cid, args)
    counts["saves that fit, checked bit-exact"] += 1
    return True


def test_saves_on_a_full_tmpfs(tmpfs, figures):
    disk = tmpfs("size=8m")
    mgr = CheckpointManager(os.path.join(disk, "store"))
    counts = dict.fromkeys(
        ["saves refused with ENOSPC, usage restored exactly", "saves that fit, checked bit-exact"], 0
    )
    base = usage(disk)
    assert attempt(mgr, disk, "tree", 0, "tree", counts)
    need = usage(disk)[0] - base[0]  # what one such checkpoint takes
    levels = [0, 4096, need // 100, need // 10, need // 4, need // 2, 3 * need // 4, 9 * need // 10]
    levels += [need - 4096, need, need + 8192, need + need // 10, 2 * need]
    it = 1
    for i, free in enumerate(levels):
        fill_to(disk, free)
        committed = attempt(mgr, disk, "tree", it, "tree", counts, blocking=i % 3 != 2)
        if committed:
            mgr.delete_checkpoint(f"tree-i{it:012d}")
        it += 1
    fill_to(disk, need // 2)
    for shape in ("leaf", "incremental"):  # other shapes on the nearly full disk
        attempt(mgr, disk, shape, it, shape, counts)
        it += 1
    os.unlink(os.path.join(disk, "filler"))
    assert_checkpoint_is(mgr, "tree-i000000000000", make_save_args("tree", 0))
    assert counts["saves refused with ENOSPC, usage restored exactly"] >= 6
    assert counts["saves that fit, checked bit-exact"] >= 3
    fig = figures[FIG]
    add(fig, "fill levels (free space from 0 to 2x a checkpoint)", len(levels) + 2)
    for k, v in counts.items():
        add(fig, k, v)
    fig["partial commits / bytes or inodes not returned"] = "0 / 0"


def test_saves_when_inodes_run_out(tmpfs, figures):
    disk = tmpfs("size=64m,nr_inodes=64")
    mgr = CheckpointManager(os.path.join(disk, "store"))
    counts = dict.fromkeys(
        ["saves refused with ENOSPC, usage restored exactly", "saves that fit, checked bit-exact"], 0
    )
    assert attempt(mgr, disk, "leaf", 0, "leaf", counts)  # about a dozen inodes
    spare = []
    while True:  # use up the inodes, then give them back a few at a time
        try:
            p = os.path.join(disk, f"f{len(spare)}")
            open(p, "w").close()
            spare.append(p)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            break
    it = 1
    while spare and not attempt(mgr, disk, "leaf", it, "leaf", counts):
        for _ in range(3):
            if spare:
                os.unlink(spare.pop())
        it += 1
    assert counts["saves refused with ENOSPC, usage restored exactly"] >= 3
    # and once enough inodes were given back, a save fitted again (the loop also ends when
    # the spare files run out: that would be a store that cannot save any more)
    assert counts["saves that fit, checked bit-exact"] == 2, counts
    fig = figures[FIG]
    add(fig, "inode levels (tmpfs with 64 inodes)", it)
    for k, v in counts.items():
        add(fig, k, v)
