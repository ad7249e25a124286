"""The local directory backend of the store contract (``_base.Store``).

Commit protocol (spec/FORMAT.md, "Store layout and commit protocol"): a save
writes into ``.cfs-staging/<token>/`` on the same file system while holding the
lock file ``.cfs-staging/<token>.lock``; every file and directory is synced; the
directory is renamed to ``<checkpoint_id>`` without replacing a committed
checkpoint; then the store directory is synced.  A staging directory whose lock
nobody holds belongs to a dead writer and is the only thing stale-cleanup
removes; a cleaner removes a lock file only while holding its lock, and a writer
checks before it locks and before it commits that the lock it holds is still the
file on disk.  What holds a lock, syncs and renames without replacing on this
platform is ``_platform``'s choice (``flock``, ``fdatasync``, ``renameat2`` on
Linux; spec section 3.4 for the others).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from computable_flows_shim import _platform
from computable_flows_shim._format import spec as S
from computable_flows_shim._format.io import fsync_dir
from computable_flows_shim.errors import CheckpointExistsError, CheckpointWriteError
from computable_flows_shim.store._base import Store
from computable_flows_shim.store._tags import TagIndex


class LocalDirectoryStore(Store):
    """Checkpoints as directories under ``root`` on a local file system (Linux, macOS, Windows)."""

    supports_rename = True
    supports_links = True

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)
        self._staging_root = os.path.join(self.root, S.STAGING_DIR)
        self._trash_root = os.path.join(self.root, S.TRASH_DIR)

    def __repr__(self) -> str:
        return f"LocalDirectoryStore({self.root!r})"

    def names(self) -> list[str]:
        with os.scandir(self.root) as it:
            return [e.name for e in it if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def exists(self, name: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self.path(name)).st_mode)  # a symlink is never a checkpoint
        except FileNotFoundError:
            return False

    def _lock(self, name: str) -> tuple[str, int]:
        """Create and hold the lock of a fresh staging token (see module docstring)."""
        os.makedirs(self._staging_root, exist_ok=True)
        while True:
            token = f"{name}.{os.getpid()}.{secrets.token_hex(6)}"
            lock = os.path.join(self._staging_root, token + ".lock")
            fd = _platform.create_lock(lock)
            if _is_file_of(lock, fd):
                return token, fd
            os.close(fd)  # a cleaner removed the file between create and lock: start again, under a new token

    @contextmanager
    def staging(self, name: str, durable: bool = True) -> Iterator[tuple[str, Callable[..., None]]]:  # type: ignore[override]
        """Yield ``(tmpdir, commit)``; leaving without calling ``commit()`` removes tmpdir."""
        token, fd = self._lock(name)
        tmp = os.path.join(self._staging_root, token)
        lock = tmp + ".lock"
        committed = False

        def commit(extra_objects: object = None) -> None:  # other processes' files are in tmp already
            nonlocal committed
            if not _is_file_of(lock, fd):  # cleanup took the staging for abandoned: never publish what is left
                raise CheckpointWriteError(
                    f"saving checkpoint {name!r}: the lock of its staging directory {tmp} was removed while "
                    "writing (by a stale cleanup that does not honour held locks?); nothing was committed"
                )
            try:
                _platform.rename_noreplace(tmp, self.path(name))
            except FileExistsError:
                raise CheckpointExistsError(f"checkpoint {name!r} already exists in {self.root}") from None
            if durable:
                try:
                    fsync_dir(self.root)
                except OSError as e:
                    # The rename may not survive a power loss and the caller is told the save
                    # failed, so take it back: a failed save leaves nothing visible (spec/FORMAT.md,
                    # section 3, step 4; found by tests/reliability/test_io_faults.py).
                    try:
                        os.rename(self.path(name), tmp)
                    except OSError as e2:
                        committed = True
                        raise CheckpointWriteError(
                            f"checkpoint {name!r} was committed, complete, but fsync of {self.root} failed ({e}) "
                            f"and it could not be taken back ({e2}): it may not survive a power loss"
                        ) from e
                    raise
            committed = True

        try:
            os.mkdir(tmp)
            yield tmp, commit
        finally:
            try:
                if not committed:
                    shutil.rmtree(tmp, ignore_errors=True)
            finally:
                _platform.unlink_lock(lock)
                os.close(fd)

    def tag_index(self, durable: bool = True) -> TagIndex:
        return TagIndex(self.root, durable)

    def staging_ref(self, tmp: str) -> str:
        return os.path.relpath(tmp, self._staging_root)

    @contextmanager
    def join_staging(self, name: str, ref: str) -> Iterator[tuple[str, Callable[[], dict]]]:  # type: ignore[override]
        """The committing process's staging directory itself (a file system every process shares)."""
        tmp = os.path.join(self._staging_root, ref)
        if os.sep in ref or not ref.startswith(name + ".") or not os.path.isdir(tmp):
            raise CheckpointWriteError(
                f"saving checkpoint {name!r}: the staging directory {tmp} is not visible here "
                "(the store must be on a file system every process shares)"
            )
        yield tmp, dict

    def delete(self, name: str) -> bool:
        os.makedirs(self._trash_root, exist_ok=True)
        trash = os.path.join(self._trash_root, f"{name}.{os.getpid()}.{secrets.token_hex(6)}")
        try:
            os.rename(self.path(name), trash)
        except FileNotFoundError:
            return False
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def cleanup_stale(self) -> int:
        removed = 0
        if os.path.isdir(self._trash_root):
            for entry in sorted(os.listdir(self._trash_root)):
                shutil.rmtree(os.path.join(self._trash_root, entry), ignore_errors=True)
                removed += 1
        if not os.path.isdir(self._staging_root):
            return removed
        for entry in sorted(os.listdir(self._staging_root)):  # "<token>" sorts before "<token>.lock"
            path = os.path.join(self._staging_root, entry)
            lock = path if entry.endswith(".lock") else path + ".lock"
            fd = self._claim(lock)
            if fd is None:
                continue  # a live writer holds it
            try:
                if not entry.endswith(".lock"):
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
                # Unlinked while we still hold its flock: a writer that takes the lock after we let go
                # finds its file gone and starts again under a new token (``_lock``).  Unlinking after
                # letting go would leave such a writer holding a lock on a file nobody can see, and the
                # next cleanup would delete its staging directory under it
                # (tests/reliability/test_cleanup_race.py).
                _platform.unlink_lock(lock)
            finally:
                if fd >= 0:
                    os.close(fd)
        return removed

    @staticmethod
    def _claim(lock: str) -> int | None:
        """Take ``lock`` if no live process holds it: its fd, held (the caller closes it), or -1
        when the file is gone (or nothing needs holding); None when a live writer holds it, or
        when this platform cannot tell (``_platform.claim_lock``).  A staging directory without
        its lock file is abandoned: writers remove their lock file only after their staging
        directory, and cleaners only while holding its lock."""
        try:
            return _platform.claim_lock(lock)
        except FileNotFoundError:
            return -1


def _is_file_of(path: str, fd: int) -> bool:
    """Whether ``path`` names the very file open as ``fd`` (not removed, not replaced)."""
    try:
        st, fst = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)
