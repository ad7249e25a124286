"""Disk usage of a store: bytes per run and per checkpoint, each file counted once.

Checkpoints share files through hard links: a rollback links every array file of its
source (``_writer.link_group``) and an incremental save links the chunks that did not
change.  Summing file sizes per checkpoint would count those bytes several times and
promise space a delete does not free.  So files are identified by ``(st_dev, st_ino)``:
a checkpoint's ``exclusive_bytes`` are the files all of whose links (``st_nlink``) are
inside it (what deleting it alone frees), the rest of its bytes are ``shared``; the
same holds per run, and :meth:`DiskUsage.freed_by` answers for any set of checkpoints.
A link outside the scanned checkpoints (another run, a save in flight, a user's copy)
keeps a file "shared": it is never promised as freed.

Sizes are file sizes (``st_size``), not allocated blocks; directories are not counted.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from computable_flows_shim._format import spec as S
from computable_flows_shim._types import CheckpointId, RunId, Step
from computable_flows_shim.store._base import Store

_Inode = tuple


class _SharedBytes:
    """``shared_bytes`` (also linked from elsewhere) of a usage with ``bytes`` and ``exclusive_bytes``."""

    bytes: int
    exclusive_bytes: int

    @property
    def shared_bytes(self) -> int:
        return self.bytes - self.exclusive_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "shared_bytes": self.shared_bytes}  # type: ignore[call-overload]


@dataclass(frozen=True)
class CheckpointUsage(_SharedBytes):
    """Bytes of one checkpoint: ``bytes`` (its files, each once), of which ``exclusive_bytes``
    are freed by deleting it alone and ``shared_bytes`` are hard-linked from elsewhere."""

    checkpoint_id: CheckpointId
    run_id: RunId
    iteration: Step
    files: int
    bytes: int
    exclusive_bytes: int


@dataclass(frozen=True)
class RunUsage(_SharedBytes):
    """Bytes of one run's checkpoints, each file once: ``exclusive_bytes`` are freed by
    deleting the whole run, ``shared_bytes`` are also linked from outside it."""

    run_id: RunId
    checkpoints: int
    bytes: int
    exclusive_bytes: int


@dataclass(frozen=True)
class DiskUsage:
    """The result of :meth:`CheckpointManager.disk_usage`.

    ``total_bytes`` counts every scanned file once; ``runs`` and ``checkpoints`` are sorted
    by run id and iteration (newest first within a run).
    """

    root: str
    total_bytes: int
    runs: tuple[RunUsage, ...]
    checkpoints: tuple[CheckpointUsage, ...]
    _files: dict[_Inode, tuple[int, int, Counter]] = field(repr=False, compare=False)

    def freed_by(self, checkpoint_ids: Iterable[CheckpointId]) -> int:
        """Bytes that deleting all of ``checkpoint_ids`` (among the scanned ones) would free:
        the files with no link left outside them.

        Example::

            >>> du = mgr.disk_usage("run-a")
            >>> du.freed_by(mgr.apply_retention("run-a", KeepLatest(3), dry_run=True).deleted)
        """
        ids = set(checkpoint_ids)
        return sum(
            size for size, nlink, where in self._files.values() if sum(n for c, n in where.items() if c in ids) >= nlink
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "total_bytes": self.total_bytes,
            "runs": [r.to_dict() for r in self.runs],
            "checkpoints": [c.to_dict() for c in self.checkpoints],
        }


def disk_usage(store: Store, run_id: RunId | None = None) -> DiskUsage:
    """Scan the committed checkpoints of ``store`` (only ``run_id``'s when given); see the module docstring."""
    if run_id is not None:
        S.validate_run_id(run_id)
    found: list[tuple[str, int, CheckpointId]] = []
    for name in store.names():
        m = S.CHECKPOINT_ID_RE.match(name)
        if m and (run_id is None or m.group("run") == run_id):
            found.append((m.group("run"), int(m.group("it")), name))
    found.sort(key=lambda t: (t[0], -t[1]))
    files: dict[_Inode, tuple[int, int, Counter]] = {}
    per_ckpt: dict[CheckpointId, set[_Inode]] = {}
    for _run, _it, cid in found:
        inodes = per_ckpt[cid] = set()
        for key, size, nlink in store.files(cid):
            entry = files.setdefault(key, (size, nlink, Counter()))
            entry[2][cid] += 1
            inodes.add(key)

    def exclusive(inodes: set[_Inode], ids: set[CheckpointId]) -> int:
        return sum(files[k][0] for k in inodes if sum(n for c, n in files[k][2].items() if c in ids) >= files[k][1])

    ckpts = tuple(
        CheckpointUsage(
            cid,
            run,
            it,
            len(per_ckpt[cid]),
            sum(files[k][0] for k in per_ckpt[cid]),
            exclusive(per_ckpt[cid], {cid}),
        )
        for run, it, cid in found
    )
    runs: list[RunUsage] = []
    for run in dict.fromkeys(r for r, _, _ in found):
        ids = {cid for r, _, cid in found if r == run}
        inodes = set().union(*(per_ckpt[c] for c in ids))
        runs.append(RunUsage(run, len(ids), sum(files[k][0] for k in inodes), exclusive(inodes, ids)))
    root = getattr(store, "root", str(store))
    return DiskUsage(root, sum(v[0] for v in files.values()), tuple(runs), ckpts, files)


__all__ = ["CheckpointUsage", "DiskUsage", "RunUsage", "disk_usage"]
