"""The format layer's I/O plumbing: the thread pools that read and write chunk files, and
the file-system syncs (one implementation of each, used by the writer, the reader and the
stores)."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

POOL = ThreadPoolExecutor(max_workers=max(4, 2 * (os.cpu_count() or 1)), thread_name_prefix="cfs-io")
REMOTE_POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="cfs-fetch")
"""Reads of a remote checkpoint's chunks wait on the network, not the CPU: more in flight."""
BATCH_BYTES = 4 << 20
"""Small tasks are packed into batches of up to this many bytes (and 64 tasks)."""


def run_all(tasks: list[Callable[[], Any]], pool: ThreadPoolExecutor = POOL) -> list[Any]:
    """Run ``tasks`` on the I/O pool; the first failure cancels the rest and is raised."""
    if len(tasks) <= 1:
        return [t() for t in tasks]
    futures: list[Future] = [pool.submit(t) for t in tasks]
    try:
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        for f in futures:
            if not f.cancelled():
                try:
                    f.result()
                except BaseException:
                    pass
        raise


def run_batched(tasks: list[Callable[[], Any]], weights: list[int] | None = None) -> list[Any]:
    """Like :func:`run_all`, packing small tasks into batches (up to 64 tasks or
    :data:`BATCH_BYTES` of ``weights``) so that thousands of tiny leaves do not pay a thread
    hand-off each."""
    weights = weights or [0] * len(tasks)
    batches: list[list[Callable[[], Any]]] = [[]]
    load = 0
    for t, w in zip(tasks, weights):
        if batches[-1] and (len(batches[-1]) >= 64 or load + w > BATCH_BYTES):
            batches.append([])
            load = 0
        batches[-1].append(t)
        load += w
    results = run_all([partial(lambda ts: [t() for t in ts], b) for b in batches if b])
    return [r for batch in results for r in batch]


_syncfs: Any
try:
    _syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    _syncfs.argtypes = [ctypes.c_int]
except (OSError, AttributeError):  # not Linux
    _syncfs = None


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        got = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return got >= (major, minor)


HAVE_SYNCFS = _syncfs is not None and _kernel_at_least(5, 8)
"""One ``syncfs`` may replace per-file syncs: Linux, from 5.8 on (before, ``syncfs`` did not
report writeback errors, so a failed write could go unnoticed)."""


def syncfs(fd: int) -> None:
    """Make everything written to the file system holding the open ``fd`` durable: file data,
    sizes and directory entries (Linux ``syncfs(2)``; since Linux 5.8 it reports a writeback
    error on that file system since ``fd`` was opened)."""
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available on this platform")
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: str) -> None:
    """Make an existing file's data durable (fdatasync through a read-only descriptor)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


__all__ = [
    "POOL",
    "REMOTE_POOL",
    "BATCH_BYTES",
    "run_all",
    "run_batched",
    "fsync_dir",
    "sync_file",
    "syncfs",
    "HAVE_SYNCFS",
]
