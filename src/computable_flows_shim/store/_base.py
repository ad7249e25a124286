"""The store contract: where checkpoints live and how they commit (small on purpose).

One implementation per backend: ``_local.LocalDirectoryStore`` (a directory; commit by a
no-replace rename, spec/FORMAT.md section 3) and ``_s3.ObjectStore`` (an object store; commit
by a conditional commit record, section 3.2).  A new backend subclasses :class:`Store` in a
file of its own here.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from computable_flows_shim._format.arrays import Mirror, Sink


class Store(abc.ABC):
    """The contract a checkpoint backend implements (small on purpose)."""

    supports_rename: bool = False
    supports_links: bool = False
    """Chunks identical to the run's previous checkpoint can be linked, not written (incremental saves)."""
    staging_is_final: bool = True
    """The staging directory's files are the committed bytes (so a durable save fsyncs them);
    False where ``commit`` uploads them elsewhere (an object store)."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Names of committed entries (never staging or trash)."""

    @abc.abstractmethod
    def path(self, name: str) -> str:
        """A local directory holding a committed entry, for this package's readers."""

    def mirror(self, name: str) -> Mirror | None:
        """The seam through which a remote store feeds the readers: what stands for the files
        of ``name`` under :meth:`path` that are not there yet (fetched on first read; see
        ``_format.arrays.Mirror``), passed by the caller to every read.  None for a store whose
        files are all local."""
        return None

    def url(self, name: str) -> str:
        """Where other tools (zarr-python, tensorstore, xarray) open a committed entry."""
        return self.path(name)

    def materialize(self, name: str) -> str:
        """Like :meth:`path`, with every file of the entry present locally (for walks
        over all files: verify, rollback)."""
        return self.path(name)

    def files(self, name: str) -> list[tuple[tuple, int, int]]:
        """``(identity, size, links)`` of every file of a committed entry: files with one
        identity are one file (hard links), counted once by disk usage (``_usage.py``).
        A checkpoint deleted meanwhile yields nothing."""
        out = []
        for base, _dirs, names in os.walk(self.path(name)):
            for f in names:
                try:
                    st = os.lstat(os.path.join(base, f))
                except FileNotFoundError:
                    continue
                out.append(((st.st_dev, st.st_ino), st.st_size, st.st_nlink))
        return out

    @abc.abstractmethod
    def tag_index(self, durable: bool = True) -> Any:
        """The store's tags (a ``TagIndex``-like object: add/remove/of/all/drop)."""

    @abc.abstractmethod
    def exists(self, name: str) -> bool: ...

    @abc.abstractmethod
    def staging(self, name: str, durable: bool = True) -> AbstractContextManager[tuple[str, Callable[..., None]]]:
        """Context manager yielding ``(dir, commit)``: ``commit(extra_objects=None)`` publishes ``dir`` as
        ``name`` (``extra_objects``: what other processes' :meth:`join_staging` ``finish()`` returned)."""

    def sink(self, tmp: str) -> Sink | None:
        """Where a save into the staging area ``tmp`` sends its chunk files instead of writing
        them there (``_format.arrays.Sink``): an object store PUTs them from memory as they
        come.  None (the default): the files are written into ``tmp``."""
        return None

    def staging_ref(self, tmp: str) -> str:
        """A string naming the staging area ``tmp`` that other processes can join (multi-process saves)."""
        raise NotImplementedError(f"{self!r} does not support multi-process saves")

    def join_staging(self, name: str, ref: str) -> AbstractContextManager[tuple[str, Callable[[], dict]]]:
        """Another process's part of a save: yield ``(dir, finish)``; write files into ``dir``, then
        ``finish()`` makes them part of the staging area and returns what the committing
        process passes to ``commit(...)``."""
        raise NotImplementedError(f"{self!r} does not support multi-process saves")

    @abc.abstractmethod
    def delete(self, name: str) -> bool:
        """Remove a committed entry atomically; False if there was none."""

    @abc.abstractmethod
    def cleanup_stale(self) -> int:
        """Remove what dead writers left behind; returns how many entries."""


__all__ = ["Store"]
