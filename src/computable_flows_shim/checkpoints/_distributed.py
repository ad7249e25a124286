"""Multi-process saves: every JAX process writes its own shards, process 0 commits once.

When ``jax.process_count() > 1`` (after ``jax.distributed.initialize``), every process
calls ``create_checkpoint`` with the same arguments (SPMD), and the save runs here:

1. Process 0 opens the store's staging area (a local-directory store on a file system
   every process shares: the staging directory, holding its lock; an object store: an
   upload token, its marker PUT), creates every group and array directory, and shares
   the staging reference (``Store.staging_ref``) through the distributed runtime's
   key-value store.
2. Every process writes the chunk files of its own addressable shards with
   ``replica_id == 0`` (process 0 also writes the leaves that are not global
   ``jax.Array``\\s, and the telemetry): into that one directory, or (object store) into
   a local directory whose files it PUTs under the upload's token (``Store.join_staging``);
   then it publishes the CRC32C of each chunk it wrote (and the objects it PUT), or its
   error.
3. Barrier ``written`` (with a timeout).  Process 0 gathers every process's CRCs,
   checks that every chunk of every array was written by someone, writes the array
   ``zarr.json`` files with the full manifests and the root metadata, and commits
   (the rename); it publishes the result, which every other process reads.
4. Barrier ``done`` (with a timeout): every process returns only after the commit and
   knows whether it happened.

Any failure before the commit (a process raising, killed, or slower than the timeout)
means no commit: process 0 leaves the staging context, which removes the directory or the
upload (if process 0 itself dies: its lock is released and the next stale cleanup removes
the directory; an upload is removed by cleanup once its lease has expired), and
every surviving process raises :class:`DistributedSaveError` (a process whose own save
raised re-raises its own error) within the timeout of the wait it was in.

What JAX's coordination service does meanwhile (jax 0.10.2, observed in
tests/test_multiprocess.py): a SIGKILLed process is declared dead after
``heartbeat_timeout_seconds`` (``jax.distributed.initialize``, default 100 s), and then
the service *terminates every other process* (``Terminating process because the JAX
distributed service detected fatal errors``, SIGABRT).  So the save's timeout should be
shorter than the heartbeat timeout for the error to reach the caller first.  If process 0
(which hosts the service) dies, the other processes are terminated at once.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import warnings
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from computable_flows_shim._format import writer as _writer
from computable_flows_shim._format.codecs import LeafPolicy
from computable_flows_shim.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointWarning,
    CheckpointWriteError,
    DistributedSaveError,
)
from computable_flows_shim.store._base import Store

DEFAULT_TIMEOUT = 300.0
"""Seconds each wait for the other processes of a multi-process save may take."""

_SEQ = itertools.count()
"""Saves made by this process: the same sequence on every process (SPMD), so that the
key-value keys and barrier names of one save are unique and agreed without talking."""


def active() -> bool:
    """True when this is one process of several (``jax.distributed.initialize`` was called)."""
    return jax.process_count() > 1


def _client() -> Any:
    from jax._src.distributed import global_state

    if global_state.client is None:
        raise CheckpointWriteError("multi-process save: jax.distributed is not initialized on this process")
    return global_state.client


def _ms(timeout: float) -> int:
    return max(1, int(timeout * 1000))


def _barrier(client: Any, name: str, timeout: float, what: str) -> None:
    try:
        client.wait_at_barrier(name, _ms(timeout))
    except Exception as e:  # JaxRuntimeError: DEADLINE_EXCEEDED, or a peer set to ERROR
        committed = "" if name.endswith("/done") else "nothing was committed; "
        raise DistributedSaveError(
            f"{what}: {committed}not every process reached barrier {name!r} within {timeout:g} s "
            f"(a process failed, was killed or is slower than the timeout): {str(e).splitlines()[0]}"
        ) from None


def _get(client: Any, key: str, timeout: float, what: str) -> str:
    try:
        return client.blocking_key_value_get(key, _ms(timeout))
    except Exception as e:
        raise DistributedSaveError(f"{what}: no {key!r} within {timeout:g} s: {str(e).splitlines()[0]}") from None


def _encode(crcs: dict[str, dict[int, int]], stats: _writer.WriteStats, objects: dict | None = None) -> str:
    packed = {
        path: [
            base64.b64encode(np.fromiter(d.keys(), np.int64, len(d)).tobytes()).decode(),
            base64.b64encode(np.fromiter(d.values(), np.uint32, len(d)).tobytes()).decode(),
        ]
        for path, d in crcs.items()
    }
    s = stats
    return json.dumps(
        {
            "crcs": packed,
            "stats": [s.bytes_written, s.chunks_written, s.chunks_linked, s.bytes_linked],
            "objects": objects or {},  # an object store's {key: [size, crc32c]} of the objects this process PUT
        }
    )


def _decode(text: str) -> tuple[dict[str, dict[int, int]], list[int], dict]:
    doc = json.loads(text)
    crcs = {
        path: dict(
            zip(
                np.frombuffer(base64.b64decode(i), np.int64).tolist(),
                np.frombuffer(base64.b64decode(c), np.uint32).tolist(),
            )
        )
        for path, (i, c) in doc["crcs"].items()
    }
    return crcs, doc["stats"], doc.get("objects", {})


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


def save(
    store: Store,
    cid: str,
    attrs: dict,
    state: Any,
    telemetry_history: Any,
    timeout: float,
    *,
    durable: bool,
    base_dir: str | None,
    compression: LeafPolicy | None = None,
    pack_max_bytes: int = 0,
) -> _writer.WriteStats:
    """One multi-process save; every process calls it with the same arguments.  ``durable``:
    fsync what is written into the staging area; ``base_dir``: the run's previous checkpoint
    (incremental saves); ``compression``: each leaf's compression (an array spread over several
    processes is compressed as asked, without the switch-off rule: all its chunks share one
    codec); ``pack_max_bytes``: host leaves packed (every process plans the same packs; process
    0 writes them).  Returns what was written, all processes counted on process 0."""
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"distributed_timeout must be a positive number of seconds, got {timeout!r}")
    if type(store).join_staging is Store.join_staging:
        raise CheckpointWriteError(f"multi-process saves are not supported by {store!r}")
    pid, nproc = jax.process_index(), jax.process_count()
    job = _Job(
        store,
        cid,
        _client(),
        f"cfs/save/{next(_SEQ)}/{cid}",
        f"multi-process save of checkpoint {cid!r} (process {pid} of {nproc})",
        timeout,
        durable,
        base_dir,
        compression,
        pack_max_bytes,
    )
    if pid != 0:
        return _save_part(job, pid, attrs, state, telemetry_history)
    return _save_and_commit(job, nproc, attrs, state, telemetry_history)


def is_primary() -> bool:
    """Whether this process commits multi-process saves (and so applies retention after them)."""
    return jax.process_index() == 0


@dataclass(frozen=True)
class _Job:
    store: Store
    cid: str
    client: Any
    prefix: str
    what: str
    timeout: float
    durable: bool
    base_dir: str | None
    compression: LeafPolicy | None = None
    pack_max_bytes: int = 0


def _save_part(job: _Job, pid: int, attrs: dict, state: Any, telemetry_history: Any) -> _writer.WriteStats:
    """A process other than 0: write its shards into the staging area process 0 opened,
    publish their CRCs, wait for the commit."""
    client, prefix, what, store = job.client, job.prefix, job.what, job.store
    own_error: BaseException | None = None
    stats = _writer.WriteStats()
    try:
        prepared = _writer.Prepared.of(
            attrs, state, telemetry_history, compression=job.compression, pack_max_bytes=job.pack_max_bytes
        )
        ref = _get(client, f"{prefix}/staging", job.timeout, what)
        if ref.startswith("!"):
            raise DistributedSaveError(f"{what}: process 0 failed before writing: {ref[1:]}")
        # a shared directory's staging itself, or (object store) a local one: chunks are PUT as they
        # are written (the sink), and finish() waits for them
        with store.join_staging(job.cid, ref) as (tmp, finish_part):
            if not store.staging_is_final:
                _writer.make_dirs(tmp, prepared)
            crcs, stats = _writer.write_chunks(
                tmp, prepared, job.durable, job.base_dir, global_only=True, sink=store.sink(tmp)
            )
            objects = finish_part()
        client.key_value_set(f"{prefix}/crcs/{pid}", _encode(crcs, stats, objects))
    except Exception as e:  # noqa: BLE001 - published to process 0, then raised below
        own_error = e
        client.key_value_set(f"{prefix}/crcs/{pid}", "!" + _describe(e))
    _barrier(client, f"{prefix}/written", job.timeout, what)
    result = _get(client, f"{prefix}/result", job.timeout, what + ", waiting for process 0 to commit")
    try:
        _barrier(client, f"{prefix}/done", job.timeout, what)
    except DistributedSaveError as e:
        if result == "ok":  # committed and complete: a process failed afterwards
            warnings.warn(f"{e} (after the commit)", CheckpointWarning, stacklevel=4)
    if own_error is not None:
        raise _as_write_error(own_error, job.cid)
    if result != "ok":
        raise DistributedSaveError(f"{what}: nothing was committed: {result[1:]}")
    return stats


def _gather(job: _Job, nproc: int, crcs: dict, stats: _writer.WriteStats, failures: list[str]) -> tuple:
    """Process 0: every other process's chunk CRCs, objects and stats (or its failure)."""
    extra_objects: dict = {}
    for p in range(1, nproc):
        try:
            text = job.client.key_value_try_get(f"{job.prefix}/crcs/{p}")
        except Exception:  # noqa: BLE001 - NOT_FOUND: it passed the barrier without publishing
            text = "!published no chunk checksums"
        if text.startswith("!"):
            failures.append(f"process {p}: {text[1:]}")
            continue
        other, s, objects = _decode(text)
        extra_objects.update(objects)
        for path, d in other.items():
            crcs.setdefault(path, {}).update(d)
        stats = _writer.WriteStats(
            stats.bytes_written + s[0],
            stats.chunks_written + s[1],
            stats.chunks_linked + s[2],
            stats.bytes_linked + s[3],
        )
    return crcs, stats, extra_objects


def _save_and_commit(job: _Job, nproc: int, attrs: dict, state: Any, telemetry_history: Any) -> _writer.WriteStats:
    """Process 0: open the staging area, write its own chunks, gather everyone's CRCs after
    the barrier, write the metadata and commit once."""
    client, prefix, what, store, cid = job.client, job.prefix, job.what, job.store, job.cid
    own_error: BaseException | None = None
    stats = _writer.WriteStats()
    committed, published = False, False
    failures: list[str] = []
    extra_objects: dict = {}
    crcs: dict = {}
    with contextlib.ExitStack() as staging:  # leaving it uncommitted removes the staging directory
        try:
            if store.exists(cid):
                raise CheckpointExistsError(f"checkpoint {cid!r} already exists in {store}")
            tmp, commit = staging.enter_context(store.staging(cid, job.durable))
            prepared = _writer.Prepared.of(
                attrs, state, telemetry_history, compression=job.compression, pack_max_bytes=job.pack_max_bytes
            )
            _writer.make_dirs(tmp, prepared)
            ref = store.staging_ref(tmp)
            client.key_value_set(f"{prefix}/staging", ref)
            published = True
            # its own chunks go in as every process's do (on an object store: PUT now, before the
            # barrier, so that after it only the metadata and the record remain to be written)
            with store.join_staging(cid, ref) as (ctmp, finish_part):
                if not store.staging_is_final:
                    _writer.make_dirs(ctmp, prepared)
                crcs, stats = _writer.write_chunks(ctmp, prepared, job.durable, job.base_dir, sink=store.sink(ctmp))
                extra_objects.update(finish_part())
            client.key_value_set(f"{prefix}/crcs/0", _encode(crcs, stats))
        except Exception as e:  # noqa: BLE001 - published to the others, then raised below
            own_error = e
            failures.append(f"process 0: {_describe(e)}")
            if not published:
                client.key_value_set(f"{prefix}/staging", "!" + _describe(e))
        _barrier(client, f"{prefix}/written", job.timeout, what)  # raising leaves the staging: removed
        crcs, stats, objects = _gather(job, nproc, crcs, stats, failures)
        extra_objects.update(objects)
        if not failures:
            try:
                _writer.write_metadata(tmp, prepared, crcs, job.durable)
                commit(extra_objects)
                committed = True
            except Exception as e:  # noqa: BLE001
                own_error = e
                failures.append(f"process 0: {_describe(e)}")
    result = "ok" if committed else "!" + "; ".join(failures)
    client.key_value_set(f"{prefix}/result", result)
    try:
        _barrier(client, f"{prefix}/done", job.timeout, what)
        client.key_value_delete(prefix)
    except DistributedSaveError as e:
        if not committed:
            raise DistributedSaveError(f"{e}; nothing was committed: {result[1:]}") from None
        warnings.warn(f"{e} (after the commit)", CheckpointWarning, stacklevel=4)
    if own_error is not None:
        raise _as_write_error(own_error, cid)
    if not committed:
        raise DistributedSaveError(f"{what}: nothing was committed: {result[1:]}")
    return stats


def _as_write_error(e: BaseException, cid: str) -> BaseException:
    """An OS error as the manager's single-process saves report it."""
    if isinstance(e, OSError) and not isinstance(e, CheckpointError):
        err = CheckpointWriteError(f"saving checkpoint {cid!r} failed, nothing was committed: {e}")
        err.__cause__ = e
        return err
    return e
