"""CheckpointManager: a thin composition of the codec (pytree <-> Zarr group),
a store (where bytes go and how they commit) and retention (what to keep).

Why one module: it is the one class users hold, and half of it is the docstrings and
examples of its public methods; each method delegates (the reader and writer in ``_format``,
the store, ``_retention``, ``_distributed``), so splitting it would only scatter one API.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import enum
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from computable_flows_shim import _display as _repr
from computable_flows_shim._format import reader as _reader
from computable_flows_shim._format import root as _root
from computable_flows_shim._format import spec as S
from computable_flows_shim._format import telemetry as _telemetry
from computable_flows_shim._format import writer as _writer
from computable_flows_shim._format.arrays import Mirror
from computable_flows_shim._format.codecs import CompressionOption, compression_policy
from computable_flows_shim._format.jsonattrs import to_json
from computable_flows_shim._format.packing import PACK_MAX_BYTES
from computable_flows_shim._types import CheckpointId, PyTree, RunId, Step
from computable_flows_shim.checkpoints import _distributed, _lineage, _retention
from computable_flows_shim.checkpoints._records import CheckpointInfo, VerifyReport
from computable_flows_shim.checkpoints._retention import RetentionPolicy, RetentionReport
from computable_flows_shim.checkpoints._view import CheckpointView, deleted_while_reading
from computable_flows_shim.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CheckpointWriteError,
    MetadataError,
    StoreUnavailableError,
)
from computable_flows_shim.store import _usage
from computable_flows_shim.store._base import Store
from computable_flows_shim.store._local import LocalDirectoryStore
from computable_flows_shim.store._s3 import ObjectStore, is_url

_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _finish_pending_saves() -> None:
    """At interpreter exit, finish background saves; a failure is reported, never silent."""
    for mgr in list(_LIVE):
        try:
            mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - reported, nothing else can be done at exit
            print(f"computable_flows_shim: a background checkpoint save failed: {e}", file=sys.stderr)


def _mapping(value: Any, name: str) -> Any:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MetadataError(f"{name}: expected a dict (JSON object), got {type(value).__name__}")
    return value


class _Unset(enum.Enum):
    """``create_checkpoint(compression=...)`` not given: the manager's."""

    MANAGER = "the manager's"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class CheckpointManager:
    """Create, list, load, roll back and clean up checkpoints in one store.

    ``compression`` (default None: uncompressed, format version 1): how state arrays are
    compressed, ``"zstd"``, ``"blosc"``, a :class:`Compression`, a dict of its fields, or a
    per-leaf policy ``(path, array) -> one of those or None`` (``path``: the leaf's array path
    under ``state/``, as ``LeafInfo.path`` shows it).  An array whose first chunk does not
    shrink by ``Compression.min_saving`` (10 %) is written uncompressed; a checkpoint with a
    compressed array is format version 2 (README, "Compression").

    ``pack_max_bytes`` (default 64 KiB): uncompressed state leaves of at most this many bytes
    are stored together, one array per data type under ``packed/`` (spec/FORMAT.md
    8.2), so that thousands of small leaves (biases, norms, optimizer counts) cost a few files
    instead of a directory and two files each; 0 gives every leaf its own array.  A
    checkpoint with packed leaves is format version 3.

    Example::

        >>> import numpy as np, tempfile
        >>> mgr = CheckpointManager(tempfile.mkdtemp())
        >>> cid = mgr.create_checkpoint("run-a", 100, {"x": np.arange(3.0)}, {"step": 0.1})
        >>> cid
        'run-a-i000000000100'
        >>> mgr.load_checkpoint(cid)["state"]["x"]
        array([0., 1., 2.])
    """

    def __init__(
        self,
        root: str | os.PathLike | Store,
        *,
        durable: bool = True,
        retention: RetentionPolicy | None = None,
        compression: CompressionOption = None,
        pack_max_bytes: int = PACK_MAX_BYTES,
    ) -> None:
        policy = compression_policy(compression)  # a bad value fails here, before the store is touched
        if isinstance(pack_max_bytes, bool) or not isinstance(pack_max_bytes, int) or pack_max_bytes < 0:
            raise ValueError(f"pack_max_bytes must be a non-negative int (0: no packing), got {pack_max_bytes!r}")
        self.store: Store
        if isinstance(root, Store):
            self.store = root
        elif is_url(root):
            self.store = ObjectStore(str(root))
        else:
            self.store = LocalDirectoryStore(root)
        self.durable = durable
        self.compression = compression
        """Default ``compression`` of :meth:`create_checkpoint` (see the class docstring)."""
        self._compression = policy
        self.pack_max_bytes = pack_max_bytes
        """State leaves of at most this many bytes are packed (see the class docstring)."""
        self.retention = retention
        """Default policy of :meth:`apply_retention`, applied to a run after each of its saves."""
        self.store.cleanup_stale()
        self.last_save_stats: _writer.WriteStats | None = None
        """Bytes written and chunks hard-linked by the most recent completed save."""
        self._last_saved: dict[str, str] = {}
        self._logs: dict[str, _telemetry.LogMark] = {}  # per run: what its last save wrote of an append-only log
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfs-save")
        self._pending: Future | None = None
        _LIVE.add(self)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def wait_until_finished(self) -> None:
        """Block until the save in flight (``blocking=False``) has committed; re-raise its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the save in flight (raising its failure) and stop the background saver."""
        try:
            self.wait_until_finished()
        finally:
            self._saver.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.store!r})"

    def _repr_html_(self) -> str:
        """The notebook display of the store: runs as a lineage tree, checkpoints, final energy, phases, bytes."""
        runs = _lineage.runs_from_infos(self.list_checkpoints())
        root = getattr(self.store, "root", str(self.store))
        return _repr.store_html(root, runs, list(_lineage.walk_tree(runs)), self.disk_usage())

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython's text display: the same summary as text (``repr`` stays one line, it is used in messages)."""
        if cycle:
            printer.text(repr(self))
            return
        runs = _lineage.runs_from_infos(self.list_checkpoints())
        printer.text(_repr.store_text(repr(self), runs, _lineage.format_run_tree(runs), self.disk_usage()))

    # ------------------------------------------------------------ writing
    def create_checkpoint(
        self,
        run_id: RunId,
        iteration: Step,
        state: PyTree,
        flow_config: dict | None = None,
        telemetry_history: Any = None,
        certificates: dict | None = None,
        metadata: dict | None = None,
        *,
        blocking: bool = True,
        distributed_timeout: float = _distributed.DEFAULT_TIMEOUT,
        compression: CompressionOption | _Unset = _Unset.MANAGER,
    ) -> CheckpointId:
        """Save ``state`` (any pytree) and its context as a new, committed checkpoint.

        Raises InvalidRunIdError before writing anything for a bad ``run_id``,
        CheckpointExistsError if ``(run_id, iteration)`` is already saved, and
        CheckpointWriteError (nothing committed, temporary removed) on I/O errors.

        With ``blocking=False`` it returns as soon as the state is copied to host
        memory and checked; the writing goes on in a background thread.  At most one
        save is in flight: the next save first waits for it, and its failure is raised
        by the next save, :meth:`wait_until_finished` or :meth:`close`.

        Chunks identical to the run's previous checkpoint are hard-linked, not
        written again (``last_save_stats`` says how many bytes were written).

        With a manager ``retention`` policy, the run is cleaned up after the commit
        (see :meth:`apply_retention`; an error there is raised, the checkpoint stays).

        With several JAX processes (``jax.distributed.initialize``), every process calls
        it with the same arguments; each writes its own shards into one staging directory
        and process 0 commits once, after all have written (always blocking; README,
        "Multi-process saves").  ``distributed_timeout`` bounds, in seconds, each wait for
        the other processes; past it, or when one fails, nothing is committed and the
        others raise DistributedSaveError.

        ``compression`` overrides the manager's for this save (``None``: uncompressed); see
        :class:`CheckpointManager`.  A bad value raises ValueError before anything is written.

        Example::

            >>> mgr.create_checkpoint("run-a", 200, state, compression="zstd")
            >>> mgr.create_checkpoint("run-a", 300, state,
            ...     compression=lambda path, a: "blosc" if path.startswith("opt/") else None)
        """
        self.wait_until_finished()
        policy = self._compression if compression is _Unset.MANAGER else compression_policy(compression)
        cid = S.make_checkpoint_id(run_id, iteration)
        attrs = self._base_attrs(cid, run_id, iteration, flow_config, certificates, metadata, lineage={})
        # a multi-process save: every process writes its shards, process 0 commits
        if _distributed.active():
            stats = _distributed.save(
                self.store,
                cid,
                attrs,
                state,
                telemetry_history,
                distributed_timeout,
                durable=self._fsync_staging,
                base_dir=self._base_dir(run_id),
                compression=policy,
                pack_max_bytes=self.pack_max_bytes,
            )
            self._saved(run_id, cid, stats, apply_retention=_distributed.is_primary())
            return cid
        if self.store.exists(cid):
            raise CheckpointExistsError(f"checkpoint {cid!r} already exists in {self.store}")
        base_dir = self._base_dir(run_id)
        prior = self._logs.get(run_id)
        if prior is not None and not (
            base_dir == self.store.path(prior.checkpoint) and prior.continued_by(telemetry_history)
        ):
            prior = None  # the history is not the base's log continued: its samples are compared
        prepared = _writer.Prepared.of(
            attrs,
            state,
            telemetry_history,
            copy=not blocking,
            compression=policy,
            pack_max_bytes=self.pack_max_bytes,
            prior=prior,
        )
        mark = _telemetry.LogMark.of(telemetry_history, cid, prepared.attrs[S.A_TELEMETRY_SUMMARY])
        job = partial(self._save, run_id, cid, prepared, base_dir, mark)
        if blocking:
            job()
        else:
            self._pending = self._saver.submit(job)
        return cid

    @property
    def _fsync_staging(self) -> bool:
        """Whether a save fsyncs what it writes into the staging area: for durability, where
        those files are the committed bytes (not where the store uploads them elsewhere)."""
        return self.durable and self.store.staging_is_final

    def _base_dir(self, run_id: str) -> str | None:
        """The run's most recent checkpoint (for incremental saves), from names alone."""
        last = self._last_saved.get(run_id)
        if not self.store.supports_links:
            return None  # nothing to link to: every chunk is written
        if last is None or not self.store.exists(last):
            ids = [n for n in self.store.names() if (m := S.CHECKPOINT_ID_RE.match(n)) and m.group("run") == run_id]
            last = max(ids, default=None)
        return self.store.path(last) if last is not None else None

    def _save(
        self,
        run_id: str,
        cid: str,
        prepared: _writer.Prepared,
        base_dir: str | None,
        mark: _telemetry.LogMark | None = None,
    ) -> None:
        stats: list[_writer.WriteStats] = []
        self._logs.pop(run_id, None)
        self._write(
            cid,
            lambda tmp: stats.append(
                _writer.write_group(tmp, prepared, self._fsync_staging, base_dir, self.store.sink(tmp))
            ),
        )
        if mark is not None:
            self._logs[run_id] = mark
        self._saved(run_id, cid, stats[0])

    def _saved(self, run_id: str, cid: str, stats: _writer.WriteStats, apply_retention: bool = True) -> None:
        """The books after a committed save, and the manager's retention policy."""
        self.last_save_stats = stats
        self._last_saved[run_id] = cid
        if apply_retention and self.retention is not None:
            # runs in the saver thread for blocking=False; its failure surfaces alike
            self._apply_retention(run_id, self.retention, dry_run=False, force=False)

    def _base_attrs(
        self, cid: str, run_id: str, iteration: int, flow_config: Any, certificates: Any, metadata: Any, lineage: dict
    ) -> dict:
        return {
            S.A_FORMAT: S.FORMAT_NAME,
            S.A_FORMAT_VERSION: S.FORMAT_VERSION_UNCOMPRESSED,  # the writer bumps it if it compresses
            S.A_CHECKPOINT_ID: cid,
            S.A_RUN_ID: run_id,
            S.A_ITERATION: int(iteration),
            S.A_CREATED_AT: _now(),
            S.A_FLOW_CONFIG: to_json(_mapping(flow_config, "flow_config"), "flow_config"),
            S.A_CERTIFICATES: to_json(_mapping(certificates, "certificates"), "certificates"),
            S.A_METADATA: to_json(_mapping(metadata, "metadata"), "metadata"),
            S.A_LINEAGE: lineage,
        }

    def _write(self, cid: str, fill) -> CheckpointId:
        if self.store.exists(cid):
            raise CheckpointExistsError(f"checkpoint {cid!r} already exists in {self.store}")
        try:
            with self.store.staging(cid, self.durable) as (tmp, commit):
                fill(tmp)
                commit()
        except CheckpointError:
            raise
        except OSError as e:
            raise CheckpointWriteError(f"saving checkpoint {cid!r} failed, nothing was committed: {e}") from e
        return cid

    def rollback_to_checkpoint(
        self, checkpoint_id: CheckpointId, target_run_id: RunId, iteration: Step | None = None
    ) -> CheckpointId:
        """Branch a new run from a checkpoint: a new checkpoint in ``target_run_id``
        with the same state and telemetry and lineage pointing back.  Array files
        are hard-linked where the file system allows (else copied)."""
        self.wait_until_finished()
        self._dir(checkpoint_id)
        src = self.store.materialize(checkpoint_id)
        attrs = self._attrs(checkpoint_id)
        it = attrs[S.A_ITERATION] if iteration is None else iteration
        cid = S.make_checkpoint_id(target_run_id, it)
        new = {
            **attrs,
            S.A_CHECKPOINT_ID: cid,
            S.A_RUN_ID: target_run_id,
            S.A_ITERATION: int(it),
            S.A_CREATED_AT: _now(),
            S.A_LINEAGE: {
                "rollback_from": checkpoint_id,
                "parent_run_id": attrs[S.A_RUN_ID],
                "parent_iteration": attrs[S.A_ITERATION],
            },
        }
        new[S.A_TELEMETRY_SUMMARY] = {**attrs.get(S.A_TELEMETRY_SUMMARY, {}), "total_iterations": int(it)}
        return self._write(cid, lambda tmp: _writer.link_group(src, tmp, new, self._fsync_staging))

    # ------------------------------------------------------------ reading
    def _locate(self, checkpoint_id: CheckpointId) -> tuple[str, Mirror | None]:
        """Where a committed checkpoint's files are read: its directory, and the mirror that
        feeds them for a remote store (one lookup: on an object store each costs a request)."""
        if not isinstance(checkpoint_id, str) or not S.is_checkpoint_id(checkpoint_id):
            raise CheckpointNotFoundError(
                f"{checkpoint_id!r} is not a checkpoint id (expected '<run_id>-i<iteration>')"
            )
        if not self.store.exists(checkpoint_id):
            raise CheckpointNotFoundError(f"no checkpoint {checkpoint_id!r} in {self.store}")
        mirror = self.store.mirror(checkpoint_id)
        return (mirror.root if mirror is not None else self.store.path(checkpoint_id)), mirror

    def _dir(self, checkpoint_id: CheckpointId) -> str:
        return self._locate(checkpoint_id)[0]

    def checkpoint_path(self, checkpoint_id: CheckpointId) -> str:
        """The Zarr group's location, for zarr-python, tensorstore, xarray... (a directory,
        or an ``s3://`` URL in an object store)."""
        self._dir(checkpoint_id)
        return self.store.url(checkpoint_id)

    def _attrs(self, checkpoint_id: CheckpointId, located: tuple[str, Mirror | None] | None = None) -> dict:
        path, mirror = located or self._locate(checkpoint_id)
        attrs = _root.read_attrs(path, f"checkpoint {checkpoint_id!r}", mirror)
        if attrs[S.A_CHECKPOINT_ID] != checkpoint_id:
            raise CheckpointFormatError(
                f"checkpoint {checkpoint_id!r}: its attrs name it {attrs[S.A_CHECKPOINT_ID]!r} (renamed by hand?)"
            )
        return attrs

    def load_checkpoint(self, checkpoint_id: CheckpointId, target: PyTree = None) -> dict:
        """Read a whole checkpoint eagerly, checking every chunk.

        Returns a dict with ``state`` (numpy arrays, or the target's array types
        and shardings when ``target`` is given), ``iteration``, ``run_id``,
        ``checkpoint_id``, ``created_at``, ``flow_config``, ``certificates``,
        ``metadata``, ``lineage``, ``telemetry_summary`` and ``telemetry`` (columns
        plus ``events``).
        """
        path, mirror = self._locate(checkpoint_id)
        with deleted_while_reading(path, checkpoint_id):
            attrs = self._attrs(checkpoint_id, (path, mirror))
            state = _reader.read_state(path, attrs, checkpoint_id, target, mirror)
            telemetry = _reader.read_telemetry(path, checkpoint_id, mirror)
        info = CheckpointInfo.from_attrs(attrs, path)
        return {
            "state": state,
            "checkpoint_id": checkpoint_id,
            "run_id": info.run_id,
            "iteration": info.iteration,
            "created_at": info.created_at,
            "flow_config": info.flow_config,
            "certificates": info.certificates,
            "metadata": info.metadata,
            "lineage": info.lineage,
            "telemetry_summary": info.telemetry_summary,
            "telemetry": telemetry,
        }

    def open_checkpoint(self, checkpoint_id: CheckpointId) -> CheckpointView:
        """A lazy view: attributes now, array bytes only when sliced (CheckpointNotFoundError
        if the checkpoint is deleted before a slice reads it)."""
        path, mirror = self._locate(checkpoint_id)
        with deleted_while_reading(path, checkpoint_id):
            return CheckpointView(path, self._attrs(checkpoint_id, (path, mirror)), mirror)

    def list_checkpoints(self, run_id: RunId | None = None) -> list[CheckpointInfo]:
        """Committed checkpoints, newest first; damaged entries are skipped with a CheckpointWarning."""
        if run_id is not None:
            S.validate_run_id(run_id)
        names = []
        for name in self.store.names():
            m = S.CHECKPOINT_ID_RE.match(name)
            if not m:
                warnings.warn(f"{self.store}: skipping {name!r}, not a checkpoint id", CheckpointWarning, stacklevel=2)
                continue
            if run_id is None or m.group("run") == run_id:
                names.append(name)

        def read(name: str) -> tuple[str, Any, BaseException | None]:
            try:
                return name, CheckpointInfo.from_attrs(self._attrs(name), self.store.url(name)), None
            except (CheckpointError, FileNotFoundError) as e:  # judged below, in the caller's thread
                return name, None, e

        if self.store.supports_rename or len(names) < 2:
            results = [read(n) for n in names]
        else:  # an object store: each checkpoint costs a few requests; have 16 in flight
            with ThreadPoolExecutor(max_workers=16, thread_name_prefix="cfs-list") as pool:
                results = list(pool.map(read, names))
        out = []
        for name, info, err in results:
            if err is None:
                out.append(info)
            elif isinstance(err, StoreUnavailableError):
                raise err  # not damage: skipping it would make an older checkpoint look like the latest
            elif isinstance(err, CheckpointError) and not isinstance(err, CheckpointNotFoundError):
                if self.store.exists(name):  # else deleted while listing, not damaged
                    warnings.warn(f"skipping damaged checkpoint: {err}", CheckpointWarning, stacklevel=2)
            # FileNotFoundError, CheckpointNotFoundError: deleted while listing
        out.sort(key=lambda i: (i.created_at, i.iteration, i.checkpoint_id), reverse=True)
        return out

    def get_latest_checkpoint(self, run_id: RunId) -> CheckpointId | None:
        """The id of ``run_id``'s checkpoint with the highest iteration, or None."""
        infos = self.list_checkpoints(run_id)
        return max(infos, key=lambda i: (i.iteration, i.created_at)).checkpoint_id if infos else None

    def verify_checkpoint(self, checkpoint_id: CheckpointId) -> VerifyReport:
        """Read every chunk of every array and report what is damaged
        (CheckpointNotFoundError if the checkpoint is deleted meanwhile)."""
        path = self._dir(checkpoint_id)
        try:
            path = self.store.materialize(checkpoint_id)  # an object store: every object, checked
            with deleted_while_reading(path, checkpoint_id):
                self._attrs(checkpoint_id)
        except (CheckpointNotFoundError, StoreUnavailableError):
            raise  # not damage
        except CheckpointError as e:
            return VerifyReport(checkpoint_id, [str(e)])
        problems = _reader.verify_group(path, checkpoint_id)
        if problems and not self.store.exists(checkpoint_id):
            raise CheckpointNotFoundError(f"checkpoint {checkpoint_id!r} was deleted while being verified")
        return VerifyReport(checkpoint_id, problems)

    # ------------------------------------------------------------ tags
    def tag_checkpoint(self, checkpoint_id: CheckpointId, tag: str) -> bool:
        """Name a checkpoint (``best``, ``last-good``, ``paper-figure-3``); retention never deletes
        a tagged checkpoint.  Tags live beside the immutable checkpoint (``.cfs-tags/``, see
        spec/FORMAT.md, "Tags").  False if it already had the tag.

        Example::

            >>> mgr.tag_checkpoint("run-a-i000000000100", "best")
            True
        """
        S.validate_tag(tag)
        self._dir(checkpoint_id)
        return self.store.tag_index(self.durable).add(checkpoint_id, tag)

    def untag_checkpoint(self, checkpoint_id: CheckpointId, tag: str) -> bool:
        """Remove a tag; False if the checkpoint did not have it."""
        S.validate_tag(tag)
        if not isinstance(checkpoint_id, str) or not S.is_checkpoint_id(checkpoint_id):
            raise CheckpointNotFoundError(f"{checkpoint_id!r} is not a checkpoint id")
        return self.store.tag_index(self.durable).remove(checkpoint_id, tag)

    def tags(self, checkpoint_id: CheckpointId) -> list[str]:
        """The tags of a checkpoint, sorted."""
        self._dir(checkpoint_id)
        return sorted(self.store.tag_index(self.durable).of(checkpoint_id))

    def tagged(self, tag: str | None = None, run_id: RunId | None = None) -> dict[CheckpointId, list[str]]:
        """Existing checkpoints carrying ``tag`` (any tag when None), with all their tags, by id.

        Example::

            >>> mgr.tagged("best")
            {'run-a-i000000000100': ['best']}
        """
        if tag is not None:
            S.validate_tag(tag)
        if run_id is not None:
            S.validate_run_id(run_id)
        out = {}
        for cid, tags in sorted(self.store.tag_index(self.durable).all().items()):
            m = S.CHECKPOINT_ID_RE.match(cid)
            if (tag is None or tag in tags) and (run_id is None or (m and m.group("run") == run_id)):
                if self.store.exists(cid):
                    out[cid] = sorted(tags)
        return out

    # ------------------------------------------------------------ removing
    def delete_checkpoint(self, checkpoint_id: CheckpointId) -> bool:
        """Delete atomically (it vanishes from listings at once), with its tags; False if absent.

        Tags go first: a crash in between leaves an untagged checkpoint, never tags that a
        later checkpoint with the same id would inherit."""
        if not isinstance(checkpoint_id, str) or not S.is_checkpoint_id(checkpoint_id):
            raise CheckpointNotFoundError(f"{checkpoint_id!r} is not a checkpoint id")
        self.store.tag_index(self.durable).drop(checkpoint_id)
        return self.store.delete(checkpoint_id)

    def cleanup_old_checkpoints(self, run_id: RunId, keep_last: int = 5) -> int:
        """Delete all but the ``keep_last`` highest-iteration checkpoints of a run; returns how many.

        ``apply_retention(run_id, KeepLatest(keep_last))``: tagged checkpoints and branch
        points of other runs are kept too."""
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is always kept), got {keep_last}")
        return len(self.apply_retention(run_id, _retention.KeepLatest(keep_last)).deleted)

    def apply_retention(
        self,
        run_id: RunId,
        policy: RetentionPolicy | None = None,
        *,
        dry_run: bool = False,
        force: bool = False,
        progress: Callable[[int, int, CheckpointId], None] | None = None,
    ) -> RetentionReport:
        """Delete the checkpoints of ``run_id`` that ``policy`` (default: the manager's
        ``retention``) does not keep, and report every decision with its reasons.

        Whatever the policy, the run's newest checkpoint and tagged checkpoints are kept,
        and so are branch points of other existing runs (``lineage``) unless ``force``.
        ``dry_run=True`` deletes nothing and returns the same report the real cleanup
        would (if the store does not change in between).  ``progress(done, total, id)``
        is called after each delete.

        Example::

            >>> from computable_flows_shim import KeepLatest, KeepBest
            >>> policy = KeepLatest(3) | KeepBest("final_energy", 2)
            >>> report = mgr.apply_retention("run-a", policy, dry_run=True)
            >>> [(d.checkpoint_id, d.action, d.reasons) for d in report.decisions]
        """
        self.wait_until_finished()
        S.validate_run_id(run_id)
        policy = self.retention if policy is None else policy
        if policy is None:
            raise ValueError("apply_retention: no policy given and the manager has no default retention")
        return self._apply_retention(run_id, policy, dry_run=dry_run, force=force, progress=progress)

    def _apply_retention(
        self,
        run_id: RunId,
        policy: RetentionPolicy,
        *,
        dry_run: bool,
        force: bool,
        progress: Callable[[int, int, CheckpointId], None] | None = None,
    ) -> RetentionReport:
        tags = self.store.tag_index(self.durable).all()
        decisions = _retention.plan(run_id, self.list_checkpoints(), tags, policy, force)
        report = RetentionReport(run_id, str(policy), dry_run, force, decisions)
        if not dry_run:
            doomed = report.deleted
            for n, cid in enumerate(reversed(doomed), start=1):  # oldest first
                self.delete_checkpoint(cid)
                if progress is not None:
                    progress(n, len(doomed), cid)
        return report

    # ------------------------------------------------------------ disk usage
    def disk_usage(self, run_id: RunId | None = None) -> _usage.DiskUsage:
        """Bytes per run and per checkpoint, hard-linked files (rollbacks, incremental saves)
        counted once, split into exclusive and shared; ``freed_by(ids)`` says what deleting
        some checkpoints would free.

        Example::

            >>> du = mgr.disk_usage()
            >>> [(r.run_id, r.bytes, r.exclusive_bytes) for r in du.runs]
        """
        return _usage.disk_usage(self.store, run_id)


__all__ = ["CheckpointManager", "CheckpointInfo", "VerifyReport"]
