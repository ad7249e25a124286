"""Tags: names on checkpoints (``best``, ``last-good``, ``paper-figure-3``) that retention never deletes.

A committed checkpoint is immutable (``verify`` flags any file it did not write), so
tags live beside the checkpoints, at store level: ``<store>/.cfs-tags/<checkpoint_id>/<tag>``
is an empty file (spec/FORMAT.md, "Tags").  Creating or unlinking one file is atomic,
so a tag is either there or not, with no lock; the leading ``.`` keeps the directory
out of every listing.  A tag whose checkpoint no longer exists (a crash between the
two steps of a delete) is ignored by every reader and removed with the checkpoint id's
next delete.
"""

from __future__ import annotations

import os
import secrets
import shutil

from computable_flows_shim._format import spec as S
from computable_flows_shim._format.io import fsync_dir
from computable_flows_shim._types import CheckpointId

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)  # not on Windows, whose descriptors are never inherited


class TagIndex:
    """The tags of one local store (see the module docstring for the layout)."""

    def __init__(self, root: str, durable: bool = True) -> None:
        self.root = os.path.join(root, S.TAGS_DIR)
        self._store_root = root
        self._trash = os.path.join(root, S.TRASH_DIR)
        self.durable = durable

    def _dir(self, checkpoint_id: CheckpointId) -> str:
        return os.path.join(self.root, checkpoint_id)

    def add(self, checkpoint_id: CheckpointId, tag: str) -> bool:
        """Create the tag file; False if it was already there."""
        S.validate_tag(tag)
        d = self._dir(checkpoint_id)
        while True:
            os.makedirs(d, exist_ok=True)
            try:
                fd = os.open(os.path.join(d, tag), os.O_WRONLY | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o644)
            except FileExistsError:
                return False
            except FileNotFoundError:
                continue  # a delete moved the directory away between makedirs and open: make it again
            os.close(fd)
            if self.durable:
                # every directory on the way down, the store's too: makedirs may have just created
                # .cfs-tags, whose entry is lost in a power cut until the store directory is synced
                # (found by tests/reliability/test_power_loss.py)
                for path in (d, self.root, self._store_root):
                    fsync_dir(path)
            return True

    def remove(self, checkpoint_id: CheckpointId, tag: str) -> bool:
        """Unlink the tag file; False if there was none."""
        S.validate_tag(tag)
        d = self._dir(checkpoint_id)
        try:
            os.unlink(os.path.join(d, tag))
        except FileNotFoundError:
            return False
        if self.durable:
            fsync_dir(d)
        return True

    def of(self, checkpoint_id: CheckpointId) -> frozenset[str]:
        """The tags of one checkpoint (empty when it has none)."""
        try:
            with os.scandir(self._dir(checkpoint_id)) as it:
                return frozenset(e.name for e in it if e.is_file(follow_symlinks=False) and _valid(e.name))
        except (FileNotFoundError, NotADirectoryError):
            return frozenset()

    def all(self) -> dict[CheckpointId, frozenset[str]]:
        """Every tagged checkpoint id with its tags (ids whose checkpoint is gone included:
        callers intersect with what they listed)."""
        try:
            with os.scandir(self.root) as it:
                ids = [e.name for e in it if S.is_checkpoint_id(e.name) and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return {}
        out = {cid: self.of(cid) for cid in ids}
        return {cid: tags for cid, tags in out.items() if tags}

    def drop(self, checkpoint_id: CheckpointId) -> None:
        """Remove all tags of a checkpoint atomically: rename the directory into the
        store's trash (which stale cleanup empties), then remove it."""
        os.makedirs(self._trash, exist_ok=True)
        trash = os.path.join(self._trash, f"tags.{checkpoint_id}.{os.getpid()}.{secrets.token_hex(6)}")
        try:
            os.rename(self._dir(checkpoint_id), trash)
        except FileNotFoundError:
            return
        if self.durable:
            fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)


def _valid(name: str) -> bool:
    try:
        S.validate_tag(name)
    except ValueError:
        return False
    return True
