"""The platform seam: everything the format and the local store need from the operating system
that differs between Linux, macOS and Windows, chosen once, at import, by what the platform
offers (spec/FORMAT.md, section 3.4, says what each choice guarantees).

=================  ==================  ==================  ====================  ===================
capability         Linux               macOS               Windows               other POSIX
=================  ==================  ==================  ====================  ===================
``DATA_SYNC``      ``fdatasync``       ``F_FULLFSYNC``     ``FlushFileBuffers``  ``fsync``
``DIR_SYNC``       ``fsync``           ``F_FULLFSYNC``     ``none``              ``fsync``
``RENAME``         ``renameat2``       ``renamex_np``      ``MoveFileExW``       ``check-then-rename``
``LOCKING``        ``flock``           ``flock``           ``delete-on-close``   ``none``
``HAVE_SYNCFS``    from Linux 5.8      no                  no                    no
=================  ==================  ==================  ====================  ===================

Each choice is made from a capability, not from the platform's name: ``fcntl.F_FULLFSYNC``
(on macOS the one way past the drive's volatile cache, where ``fsync`` stops),
``os.fdatasync``, the C library's ``renameat2``/``renamex_np``/``syncfs`` (looked up through
ctypes), ``fcntl.flock``, and the Win32 API (``msvcrt`` importable), whose facts (``os.rename``
is ``MoveFileExW`` without ``MOVEFILE_REPLACE_EXISTING``; ``os.open`` cannot open a directory;
``os.O_TEMPORARY`` files are deleted when their last handle closes) cannot be probed any other
way.  :func:`choose` is that decision as a pure function.

Reading never takes a lock (only a save's staging and stale cleanup do).

Every call goes through the module attribute at call time (``os.fdatasync(fd)``,
``fcntl.flock(...)``; never a name bound at import) and the C functions through module
globals (``_renameat2``, ``_renamex_np``, ``_syncfs``), so that the fault-injection and
power-loss harnesses of ``tests/reliability/`` can wrap them.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import os
import sys
from collections.abc import Callable, Container
from typing import Any


def _module(name: str) -> Any:
    """A module of the standard library that not every platform has, or None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _libc_function(name: str, argtypes: list[Any]) -> Any:
    """A function of the C library by name (errno kept for :func:`ctypes.get_errno`), or None
    where the C library has none (or where there is no C library to look in: Windows)."""
    try:
        f = ctypes.CDLL(None, use_errno=True)[name]
    except Exception:  # AttributeError: no such function; OSError or TypeError: no C library to open
        return None
    f.argtypes = argtypes
    f.restype = ctypes.c_int
    return f


_os: Any = os  # the calls only some platforms have (fdatasync, writev, uname), looked up at call time
_fcntl = _module("fcntl")
_msvcrt = _module("msvcrt")
_renameat2 = _libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
_renamex_np = _libc_function("renamex_np", [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint])
_syncfs = _libc_function("syncfs", [ctypes.c_int])

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCL = 0x4  # macOS sys/stdio.h
_UNSUPPORTED = frozenset(
    e for e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOTTY) if e is not None
)
"""What a call answers when this kernel or file system does not implement it (never an I/O error)."""


def choose(
    os_names: Container[str], fcntl_names: Container[str] | None, libc_names: Container[str], windows: bool
) -> dict[str, str]:
    """Each capability's implementation, given what the platform offers: ``os_names``, the
    names the ``os`` module has; ``fcntl_names``, the ``fcntl`` module's (None: no ``fcntl``);
    ``libc_names``, the C library functions found; ``windows``, whether the Win32 API is there.

    >>> choose({"fdatasync"}, {"flock"}, {"renameat2"}, windows=False)["rename"]
    'renameat2'
    """
    full = fcntl_names is not None and "F_FULLFSYNC" in fcntl_names
    if full:  # before fdatasync: where F_FULLFSYNC exists, fsync and fdatasync stop at the drive's cache
        data = "F_FULLFSYNC"
    elif "fdatasync" in os_names:
        data = "fdatasync"
    else:
        data = "FlushFileBuffers" if windows else "fsync"
    if "renameat2" in libc_names:
        rename = "renameat2"
    elif "renamex_np" in libc_names:
        rename = "renamex_np"
    else:
        rename = "MoveFileExW" if windows else "check-then-rename"
    if fcntl_names is not None and "flock" in fcntl_names:
        locking = "flock"
    else:
        locking = "delete-on-close" if windows and "O_TEMPORARY" in os_names else "none"
    return {
        "data_sync": data,
        "dir_sync": "none" if windows else ("F_FULLFSYNC" if full else "fsync"),
        "rename": rename,
        "locking": locking,
    }


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        got = tuple(int(x) for x in _os.uname().release.split("-")[0].split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return got >= (major, minor)


_CHOSEN = choose(
    set(dir(os)),
    None if _fcntl is None else set(dir(_fcntl)),
    {n for n, f in (("renameat2", _renameat2), ("renamex_np", _renamex_np), ("syncfs", _syncfs)) if f is not None},
    windows=_msvcrt is not None,
)
DATA_SYNC = _CHOSEN["data_sync"]
"""How :func:`sync_data` makes a file's data durable."""
DIR_SYNC = _CHOSEN["dir_sync"]
"""How :func:`sync_dir` makes a directory's entries durable (``none``: it cannot, Windows)."""
RENAME = _CHOSEN["rename"]
"""How :func:`rename_noreplace` refuses to replace."""
LOCKING = _CHOSEN["locking"]
"""What holds a lock file (:func:`create_lock`, :func:`claim_lock`)."""
HAVE_SYNCFS = _syncfs is not None and _kernel_at_least(5, 8)
"""One ``syncfs`` may replace per-file syncs: Linux, from 5.8 on (before, ``syncfs`` did not
report writeback errors, so a failed write could go unnoticed)."""
HAVE_WRITEV = hasattr(os, "writev")
"""Whether :func:`writev` is one vectored write (not on Windows)."""


# ------------------------------------------------------------------ syncs
def _full_fsync(fd: int) -> None:
    """macOS: ``fsync`` and then a flush of the drive's own cache (``F_FULLFSYNC``); a file
    system that does not implement it (SMB, some FUSE) gets ``fsync``, the best it offers.
    Unsupported is not a failed sync, so this is no retry of one."""
    try:
        _fcntl.fcntl(fd, _fcntl.F_FULLFSYNC)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
        os.fsync(fd)


def _fdatasync(fd: int) -> None:
    _os.fdatasync(fd)  # the data and the size, without the timestamps nobody needs


def _fsync(fd: int) -> None:
    os.fsync(fd)


if sys.platform == "win32":
    _kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    _kernel32.ReOpenFile.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32]
    _kernel32.ReOpenFile.restype = ctypes.c_void_p
    _kernel32.FlushFileBuffers.argtypes = [ctypes.c_void_p]
    _kernel32.FlushFileBuffers.restype = ctypes.c_int
    _kernel32.CloseHandle.argtypes = [ctypes.c_void_p]
    _kernel32.CloseHandle.restype = ctypes.c_int
    _GENERIC_WRITE = 0x40000000
    _SHARE_ALL = 0x1 | 0x2 | 0x4  # FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE
    _INVALID_HANDLE = ctypes.c_void_p(-1).value

    def _flush_file_buffers(fd: int) -> None:
        """``os.fsync`` is ``FlushFileBuffers``, which needs a handle with write access: a
        read-only descriptor (a base file compared before it is linked) is flushed through a
        writable handle to the same open file (``ReOpenFile``), never through its path."""
        try:
            os.fsync(fd)
            return
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.EACCES):
                raise
        h = _kernel32.ReOpenFile(_msvcrt.get_osfhandle(fd), _GENERIC_WRITE, _SHARE_ALL, 0)
        if h is None or h == _INVALID_HANDLE:
            raise ctypes.WinError(ctypes.get_last_error())
        try:
            if not _kernel32.FlushFileBuffers(h):
                raise ctypes.WinError(ctypes.get_last_error())
        finally:
            _kernel32.CloseHandle(h)

else:
    _flush_file_buffers = _fsync

_SYNC_DATA: Callable[[int], None] = {
    "F_FULLFSYNC": _full_fsync,
    "fdatasync": _fdatasync,
    "FlushFileBuffers": _flush_file_buffers,
    "fsync": _fsync,
}[DATA_SYNC]


def sync_data(fd: int) -> None:
    """Make the data and the size of the file open as ``fd`` durable (:data:`DATA_SYNC`).  A
    failure raises; a failed sync is never retried (the kernel may have dropped the pages)."""
    _SYNC_DATA(fd)


def sync_dir(path: str) -> None:
    """Make a directory's entries (creations, renames, removals in it) durable
    (:data:`DIR_SYNC`).  On Windows it does nothing: ``os.open`` cannot open a directory
    there, and NTFS journals its metadata itself (spec/FORMAT.md, section 3.4, says
    what that leaves unguaranteed)."""
    if DIR_SYNC == "none":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if DIR_SYNC == "F_FULLFSYNC":
            _full_fsync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(fd: int) -> None:
    """Make everything written to the file system holding the open ``fd`` durable: file data,
    sizes and directory entries (Linux ``syncfs(2)``; since Linux 5.8 it reports a writeback
    error on that file system since ``fd`` was opened).  Only where :data:`HAVE_SYNCFS`."""
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available on this platform")
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def writev(fd: int, bufs: list[Any]) -> int:
    """Write from ``bufs`` in order; the number of bytes written, which may be fewer than all
    (the caller loops).  One ``writev`` where the platform has it, else one ``write`` of the
    first buffer."""
    if HAVE_WRITEV:
        return _os.writev(fd, bufs)
    return os.write(fd, bufs[0])


# ------------------------------------------------------------------ rename without replacing
def _rename_c(result: int, src: str, dst: str) -> bool:
    """The outcome of a C rename call: True done, False not supported here (fall back),
    FileExistsError or OSError otherwise."""
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(err, os.strerror(err), dst)
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), src)


def _rename_checked(src: str, dst: str) -> None:
    """Check, then ``rename(2)``: not atomic against a racing writer of the same name, but
    ``rename(2)`` itself refuses to replace a non-empty directory (a checkpoint is never
    empty), so a committed checkpoint is never replaced."""
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(e.errno, e.strerror, dst) from None
        raise


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, atomically where the
    platform can (:data:`RENAME`): Linux ``renameat2(RENAME_NOREPLACE)``, macOS
    ``renamex_np(RENAME_EXCL)``, Windows ``os.rename`` (CPython's is ``MoveFileExW`` without
    ``MOVEFILE_REPLACE_EXISTING``, which fails on an existing target, file or directory);
    where the kernel or file system lacks the call, :func:`_rename_checked`."""
    if RENAME == "renameat2" and _renameat2 is not None:
        if _rename_c(_renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE), src, dst):
            return
    elif RENAME == "renamex_np" and _renamex_np is not None:
        if _rename_c(_renamex_np(os.fsencode(src), os.fsencode(dst), _RENAME_EXCL), src, dst):
            return
    elif RENAME == "MoveFileExW":
        try:
            os.rename(src, dst)
        except PermissionError:  # ERROR_ACCESS_DENIED: some existing targets (a directory being deleted) answer so
            if os.path.lexists(dst):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
            raise
        return
    _rename_checked(src, dst)


# ------------------------------------------------------------------ lock files
def create_lock(path: str) -> int:
    """Create the lock file ``path`` (``O_EXCL``: never an existing one) and hold it; its
    descriptor (closing it releases the lock).  ``flock``: an exclusive ``flock``, waited for
    (a cleaner may be probing the new file).  ``delete-on-close`` (Windows): the file is
    opened ``O_TEMPORARY``, so the system deletes it when its last handle closes, the
    process's death included, and any other open of it fails (sharing violation) while it is
    held.  ``none``: the file only."""
    flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOINHERIT", 0)
    if LOCKING == "delete-on-close":
        flags |= getattr(os, "O_TEMPORARY", 0)  # there whenever this is the choice (Windows)
    fd = os.open(path, flags, 0o644)
    if LOCKING == "flock":
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
    return fd


def claim_lock(path: str) -> int | None:
    """Take the existing lock file ``path`` if no live process holds it: its descriptor, held
    (the caller closes it), or -1 when nothing needs holding (``delete-on-close``: a lock file
    nobody has open can never be held again, writers only ever create new ones); None when a
    live process holds it, or when the platform cannot tell (``none``: never claimed, so
    stale cleanup never removes a live writer's work).  FileNotFoundError when it is gone."""
    if LOCKING == "flock":
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd
    if LOCKING == "delete-on-close":
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOINHERIT", 0))
        except PermissionError:  # a holder's delete-on-close handle, or a file being deleted
            return None
        os.close(fd)
        return -1
    os.stat(path)  # FileNotFoundError when it is gone
    return None


def unlink_lock(path: str) -> None:
    """Remove a lock file (already gone is fine).  With ``delete-on-close`` another cleaner
    may have it open for an instant (its probe in :func:`claim_lock`): it then stays, for the
    next cleanup."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except PermissionError:
        if LOCKING != "delete-on-close":
            raise


# ------------------------------------------------------------------ processes
def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` may be running.  POSIX: ``kill(pid, 0)``.  Windows: always
    True (``os.kill`` there terminates the process whatever the signal, so it is never used
    as a probe; what a dead process left is kept)."""
    if _msvcrt is not None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, another user's
    return True


__all__ = [
    "DATA_SYNC",
    "DIR_SYNC",
    "RENAME",
    "LOCKING",
    "HAVE_SYNCFS",
    "HAVE_WRITEV",
    "choose",
    "sync_data",
    "sync_dir",
    "syncfs",
    "writev",
    "rename_noreplace",
    "create_lock",
    "claim_lock",
    "unlink_lock",
    "pid_alive",
]
