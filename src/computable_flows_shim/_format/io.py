"""The format layer's I/O plumbing: the thread pools that read and write chunk files, and
the file-system syncs (one implementation of each, used by the writer, the reader and the
stores; what each sync is on this platform is chosen in ``_platform``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from computable_flows_shim._platform import HAVE_SYNCFS, sync_data, sync_dir, syncfs

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


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable, where the platform can (``_platform.sync_dir``:
    ``fsync``, ``F_FULLFSYNC`` on macOS, nothing on Windows)."""
    sync_dir(path)


def sync_file(path: str) -> None:
    """Make an existing file's data durable (``_platform.sync_data`` through a read-only descriptor)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        sync_data(fd)
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
