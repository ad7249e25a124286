"""Checkpoints in an object store (S3 and the servers that speak its protocol).

Object stores have no rename, so the local commit protocol (stage, fsync, rename)
becomes, for checkpoint ``<id>`` (spec/FORMAT.md, "Object stores"):

1. ``PUT .cfs-uploads/<id>/<token>.json``: an upload marker with an expiry (the lease);
2. ``PUT <id>/<token>/<key>`` for every file of the group, the bytes a directory store writes:
   each chunk from memory as the writer encodes it (the manager's writer hands it to the
   store's ``sink``, see ``_Upload``: never written to local disk), then the metadata files
   from a local staging directory, the root ``zarr.json`` last;
3. ``PUT .cfs-commits/<id>.json`` with ``If-None-Match: *``: the commit record, naming the
   upload and every object with its size and CRC32C.  The checkpoint exists from this
   moment, whole; a second writer of the same id gets 412 and nothing of its upload is
   ever visible (it wrote under its own token);
4. ``DELETE`` the marker.

A save renews its lease (re-PUTs the marker with a later expiry) while it runs, and commits
only while the lease holds (see ``_Lease``).

Readers list ``.cfs-commits/`` only and read only the objects a record names, checking
their size and CRC32C, so objects of an upload that never committed are never seen.  A
delete PUTs a marker for the checkpoint's token, removes the record (the checkpoint vanishes
at once), then the objects and the marker.  Cleanup removes uploads whose lease expired
(a delete's marker included: what a delete cut short left, even for an id committed again)
and data that no record or marker owns.

Every request is retried by obstore on 5xx answers (503 SlowDown included), resets and
timeouts, with exponential backoff, within ``DEFAULT_RETRY_CONFIG`` unless the caller
passes its own ``retry_config``; a fault that outlasts it raises our error.

Reads go through a local read-through mirror of each checkpoint: its directory tree,
metadata files fetched on first open and chunks read into memory when asked for (see
``_format.arrays.Mirror``), so lazy views read only the chunks they touch and one reader, with
all its checks, serves both backends.

Why one module: one backend, one file (as zarr-python's ``storage/``): the commit record,
the upload marker and its lease, the local mirror, retries, cleanup and tags all implement
one protocol (spec/FORMAT.md section 3.2) and share its private helpers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import partial
from typing import Any

import crc32c as _crc

from computable_flows_shim import _platform
from computable_flows_shim._format import spec as S
from computable_flows_shim._format.arrays import MAX_METADATA_BYTES, Sink
from computable_flows_shim.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CheckpointWriteError,
    MissingDependencyError,
    StoreUnavailableError,
)
from computable_flows_shim.store._base import Store

MAX_RECORD_BYTES = 64 << 20
"""A commit record larger than this is refused (bounded memory on hostile input)."""
DEFAULT_UPLOAD_LEASE = 24 * 3600.0
"""Seconds an upload's marker is valid for; a save renews it when half has run, so cleanup
removes an upload only when its writer stopped renewing (died, hung, or lost the store)."""
DELETE_LEASE = 60.0
"""Seconds a delete's marker (PUT before its record goes) keeps cleanup away from the objects
it is deleting (at most ``upload_lease``); after it, cleanup finishes a delete that died."""
DEFAULT_RETRY_CONFIG: dict[str, Any] = {
    "max_retries": 10,
    "retry_timeout": _dt.timedelta(seconds=60),
    "backoff": {"init_backoff": _dt.timedelta(milliseconds=100), "max_backoff": _dt.timedelta(seconds=10), "base": 2},
}
"""obstore's retries for every request (5xx, 503 SlowDown, connection resets, timeouts): up to
10 retries, backoff from 100 ms doubling to 10 s with jitter, none started after 60 s; so a
persistent fault raises within about 60 s plus one request's ``timeout``."""
DEFAULT_CLIENT_OPTIONS: dict[str, Any] = {"connect_timeout": "5s", "timeout": "30s"}
"""Per-request limits (obstore's own defaults, set here so that they are ours): a request that
hangs is cut off and retried within ``DEFAULT_RETRY_CONFIG``."""
TRANSPORT_RETRIES = 3
"""Retries, with backoff from 0.1 s, of what obstore does not retry (see ``ObjectStore._call``)."""
_BACKOFF = 0.1
_POOL_NAME = "cfs-s3"
_TOKEN_RE = re.compile(r"^[0-9a-f]{24}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_PART_RE = re.compile(r"^[A-Za-z0-9._%-]+$")
_URL_RE = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?$")


class _Missing(KeyError):
    """The key is not in the store."""


class _Exists(KeyError):
    """A create-only PUT found the key already there."""


class _OutcomeUnknown(CheckpointWriteError):
    """The commit record's PUT failed in a way that does not say whether it landed."""


def is_url(root: object) -> bool:
    return isinstance(root, str) and "://" in root


def _obstore() -> Any:
    try:
        import obstore
        import obstore.store  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            "s3:// checkpoint stores need obstore: pip install 'computable-flows-shim[s3]'"
        ) from e
    return obstore


def _retried(e: BaseException) -> bool:
    """obstore gave up after its own retries (its message says so: "after N retries,
    max_retries: M"); retrying again would only multiply its bounded time."""
    return "max_retries" in str(e).split("\n", 1)[0]


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _safe_key(key: object) -> bool:
    """A relative object key that maps to a file inside the mirror (never ``..``, never absolute)."""
    return (
        isinstance(key, str)
        and 0 < len(key) < 1024
        and all(p not in (".", "..") and _KEY_PART_RE.match(p) for p in key.split("/"))
    )


def _parse_record(raw: bytes, name: str, where: str) -> dict:
    """Validate a commit record (spec/FORMAT.md, "Object stores"); refuse anything else."""
    if len(raw) > MAX_RECORD_BYTES:
        raise CheckpointFormatError(f"{where}: commit record larger than {MAX_RECORD_BYTES} bytes")
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise CheckpointCorruptError(f"{where}: unreadable commit record ({e})") from None
    ok = (
        isinstance(rec, dict)
        and rec.get("format") == S.COMMIT_RECORD_FORMAT
        and rec.get("format_version") == S.COMMIT_RECORD_VERSION
        and rec.get("checkpoint_id") == name
        and isinstance(rec.get("token"), str)
        and _TOKEN_RE.match(rec["token"])
        and rec.get("data") == f"{name}/{rec['token']}"
        and isinstance(rec.get("objects"), dict)
        and "zarr.json" in rec["objects"]
    )
    if not ok:
        raise CheckpointFormatError(f"{where}: not a commit record of checkpoint {name!r}")
    for key, meta in rec["objects"].items():
        if not (
            _safe_key(key)
            and isinstance(meta, list)
            and len(meta) in (2, 3)
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 48 for v in meta[:2])
            and (len(meta) == 2 or (isinstance(meta[2], str) and _SHA256_RE.match(meta[2])))
        ):
            raise CheckpointFormatError(
                f"{where}: commit record entry {key!r}: {meta!r} is not [size, crc32c] or [size, crc32c, sha256]"
            )
    keys = rec["objects"]
    for key in keys:
        parts = key.split("/")
        for i in range(1, len(parts)):
            if (prefix := "/".join(parts[:i])) in keys:
                raise CheckpointFormatError(f"{where}: commit record names {prefix!r} as an object and a prefix")
    return rec


class ObjectStore(Store):
    """Checkpoints in an S3 bucket under a prefix: ``ObjectStore("s3://bucket/prefix")``.

    Endpoint, region and credentials come from the standard AWS environment variables
    (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ...) or from keyword
    ``options`` passed to obstore (``endpoint=``, ``region=``, ``access_key_id=``,
    ``client_options=``, ...).  An ``http://`` endpoint (a local test server) is allowed
    without further options.  ``upload_lease``: seconds an upload's marker is valid for; a
    save renews it while it runs, so only an upload whose writer stopped (killed, hung, cut
    off from the store) for that long counts as abandoned.  ``retry_config`` (obstore's)
    defaults to :data:`DEFAULT_RETRY_CONFIG`, ``client_options`` to
    :data:`DEFAULT_CLIENT_OPTIONS` for the keys it does not set.
    """

    supports_rename = False
    supports_links = False
    staging_is_final = False

    def __init__(
        self, url: str, *, upload_lease: float = DEFAULT_UPLOAD_LEASE, workers: int = 16, **options: Any
    ) -> None:
        obs = _obstore()
        m = _URL_RE.match(url) if isinstance(url, str) else None
        if m is None:
            raise ValueError(f"expected an object-store URL 's3://<bucket>/<prefix>', got {url!r}")
        self.bucket, self.prefix = m.group(1), (m.group(2) or "").strip("/")
        self.root_url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.root = self.root_url
        client_options = {**DEFAULT_CLIENT_OPTIONS, **(options.pop("client_options", None) or {})}
        options.setdefault("retry_config", DEFAULT_RETRY_CONFIG)
        env = os.environ
        endpoint = options.get("endpoint") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            options.setdefault("endpoint", endpoint)
            if endpoint.startswith("http://"):
                client_options.setdefault("allow_http", True)
        self._obs = obs
        self._exc = obs.exceptions
        self._s = obs.store.from_url(self.root_url, client_options=client_options, **options)
        self.upload_lease = float(upload_lease)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=_POOL_NAME)
        self._workers = workers
        _remove_dead_caches()
        self._cache = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{os.getpid()}-")
        self._parts = os.path.join(self._cache, ".parts")
        os.mkdir(self._parts)
        self._mirrors: dict[str, _Mirror] = {}
        self._recs: dict[str, dict] = {}
        self._last_records: dict[str, dict] = {}  # run id -> the record this store committed last
        self._uploads: dict[str, _Upload] = {}  # staging directory -> its upload (see sink)
        self.last_upload: dict[str, int] = {}
        """Objects PUT and copied server-side (unchanged chunks) by this process's last upload."""
        self.objects_read = 0
        """Objects fetched from the store by this process's readers (a lazy slice fetches only its chunks)."""
        self.bytes_read = 0
        self._lock = threading.Lock()
        weakref.finalize(self, _close, self._cache, self._pool)

    def __repr__(self) -> str:
        return f"ObjectStore({self.root_url!r})"

    # ------------------------------------------------------------ object calls
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, key_op: bool = False, **kwargs: Any) -> Any:
        """One obstore call: a missing key (``key_op``: a GET or HEAD) raises _Missing, a failed
        create-only PUT _Exists, and anything else from the store StoreUnavailableError (a
        "not found" on a PUT, LIST or DELETE means the bucket is missing).

        obstore retries 5xx answers and connection errors itself, but not a connection reset
        while sending a PUT or POST (it deems them not idempotent), nor a listing whose body is
        cut off: those are retried here, ``TRANSPORT_RETRIES`` times with backoff, except a
        create-only PUT (the commit record's caller decides by reading it back)."""
        for attempt in range(TRANSPORT_RETRIES + 1):
            try:
                return fn(self._s, *args, **kwargs)
            except (FileNotFoundError, self._exc.NotFoundError) as e:
                if not key_op:
                    raise StoreUnavailableError(
                        f"{self}: {what} failed: not found (does bucket {self.bucket!r} exist?): "
                        f"{str(e).splitlines()[0]}"
                    ) from e
                raise _Missing(what) from None
            except (FileExistsError, self._exc.AlreadyExistsError, self._exc.PreconditionError):
                raise _Exists(what) from None
            except Exception as e:
                if not isinstance(e, (self._exc.BaseError, OSError)):
                    raise
                if attempt == TRANSPORT_RETRIES or kwargs.get("mode") == "create" or _retried(e):
                    raise StoreUnavailableError(f"{self}: {what} failed: {str(e).splitlines()[0]}") from e
                time.sleep(_BACKOFF * 2**attempt)
        raise AssertionError("unreachable")

    def _get(self, key: str, limit: int | None = None) -> bytes:
        return bytes(self._get_buffer(key, limit))

    def _get_buffer(self, key: str, limit: int | None = None) -> memoryview:
        """An object's bytes without a copy (obstore's buffer).  An object larger than ``limit``
        is refused from the size in the response's headers, before its body is read (bounded
        memory on a hostile store)."""

        def get(s: Any, k: str) -> Any:
            result = self._obs.get(s, k)
            size = result.meta["size"]
            return size if limit is not None and size > limit else result.bytes()

        data = self._call(f"GET {key}", get, key, key_op=True)
        if isinstance(data, int):
            raise CheckpointFormatError(f"{self.root_url}/{key}: {data} bytes, more than the {limit} expected")
        return memoryview(data)

    def _put(self, key: str, data: bytes | memoryview, **kw: Any) -> None:
        self._call(f"PUT {key}", self._obs.put, key, data, **kw)

    def _head(self, key: str) -> bool:
        try:
            self._call(f"HEAD {key}", self._obs.head, key, key_op=True)
        except _Missing:
            return False
        return True

    def _list(self, prefix: str) -> list[dict]:
        # the listing is a lazy stream: iterate it inside the call, where its errors are mapped
        return self._call(f"LIST {prefix}", lambda s, p: [o for batch in self._obs.list(s, p) for o in batch], prefix)

    def _subdirs(self, prefix: str | None) -> list[str]:
        res = self._call(f"LIST {prefix or '/'}", self._obs.list_with_delimiter, prefix)
        return [p.rsplit("/", 1)[-1] if "/" in p else p for p in res["common_prefixes"]]

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            self._call("DELETE", self._obs.delete, keys[i : i + 1000])

    def _delete_prefix(self, prefix: str) -> None:
        self._delete_keys([o["path"] for o in self._list(prefix)])

    @staticmethod
    def _record_key(name: str) -> str:
        return f"{S.COMMITS_PREFIX}/{name}.json"

    @staticmethod
    def _marker_key(name: str, token: str) -> str:
        return f"{S.UPLOADS_PREFIX}/{name}/{token}.json"

    def _record(self, name: str) -> dict | None:
        # read twice before calling a record damaged: a body cut short on the way (a proxy that
        # ends it early with a matching length) is not damage, and must not hide a checkpoint
        for attempt in (1, 2):
            try:
                raw = self._get(self._record_key(name), MAX_RECORD_BYTES)
            except _Missing:
                return None
            try:
                return _parse_record(raw, name, f"{self.root_url}/{self._record_key(name)}")
            except (CheckpointCorruptError, CheckpointFormatError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ the Store contract
    def names(self) -> list[str]:
        out = []
        for o in self._list(S.COMMITS_PREFIX + "/"):
            rel = o["path"][len(S.COMMITS_PREFIX) + 1 :]
            if rel.endswith(".json") and S.is_checkpoint_id(rel[: -len(".json")]):
                out.append(rel[: -len(".json")])
        return out

    def exists(self, name: str) -> bool:
        return S.is_checkpoint_id(name) and self._head(self._record_key(name))

    def url(self, name: str) -> str:
        rec = self._committed(name)
        return f"{self.root_url}/{rec['data']}"

    def _committed(self, name: str) -> dict:
        rec = self._record(name) if S.is_checkpoint_id(name) else None
        if rec is None:
            raise CheckpointNotFoundError(f"no checkpoint {name!r} in {self}")
        return rec

    def mirror(self, name: str) -> _Mirror:
        """What feeds the readers the files of :meth:`path` (``_format.arrays.Mirror``)."""
        path = self.path(name)
        with self._lock:
            return self._mirrors[path]

    def path(self, name: str) -> str:
        """The checkpoint's local mirror: its directories now, metadata files on first open,
        chunks read into memory when a reader asks for them (:meth:`mirror`)."""
        rec = self._committed(name)
        mirror = os.path.join(self._cache, f"{name}.{rec['token']}")
        with self._lock:
            if mirror not in self._mirrors:
                os.makedirs(mirror, exist_ok=True)
                for key in rec["objects"]:
                    os.makedirs(os.path.dirname(os.path.join(mirror, key)), exist_ok=True)
                self._mirrors[mirror] = _Mirror(self, rec, mirror)
                self._recs[mirror] = rec
        return mirror

    def _read_object(self, rec: dict, rel: str) -> memoryview | None:
        """One object of a committed checkpoint, checked against its commit record."""
        meta = rec["objects"].get(rel)
        if meta is None:
            return None  # not part of the checkpoint: missing, as in a directory store
        where = f"{self.root_url}/{rec['data']}/{rel}"
        for attempt in (1, 2):  # a mismatch is read again once: bytes damaged on the way are not damage
            try:
                data = self._get_buffer(f"{rec['data']}/{rel}", meta[0])
            except CheckpointFormatError:
                problem = f"larger than the recorded {meta[0]} bytes"
                continue
            except _Missing:
                raise CheckpointNotFoundError(
                    f"checkpoint {rec['checkpoint_id']!r} was deleted while being read ({where} is gone)"
                ) from None
            if len(data) == meta[0] and _crc.crc32c(data) == meta[1]:
                break
            problem = f"{len(data)} bytes, CRC32C {_crc.crc32c(data):#010x}; recorded {meta[0]} bytes, {meta[1]:#010x}"
        else:
            raise CheckpointCorruptError(
                f"{where}: object of checkpoint {rec['checkpoint_id']!r} does not match the commit record "
                f"({problem}, read twice)"
            )
        with self._lock:
            self.objects_read += 1
            self.bytes_read += len(data)
        return data

    def _fetch(self, rec: dict, mirror: str, rel: str) -> bool:
        meta = rec["objects"].get(rel)
        if meta is not None and rel.rsplit("/", 1)[-1] == "zarr.json" and meta[0] > MAX_METADATA_BYTES:
            raise CheckpointFormatError(
                f"{self.root_url}/{rec['data']}/{rel}: metadata larger than {MAX_METADATA_BYTES} bytes"
            )
        data = self._read_object(rec, rel)
        if data is None:
            return False
        part = os.path.join(self._parts, secrets.token_hex(8))
        try:
            with open(part, "wb") as f:
                f.write(data)
            os.replace(part, os.path.join(mirror, rel))
        except OSError as e:  # the local disk (full?), or a mirror removed by a delete meanwhile
            raise StoreUnavailableError(f"{self}: cannot write {rel!r} into the local mirror {mirror}: {e}") from e
        return True

    def materialize(self, name: str) -> str:
        mirror = self.path(name)
        rec = self._recs[mirror]  # the record the mirror was made from (not a newer one)
        missing = [k for k in rec["objects"] if not os.path.exists(os.path.join(mirror, k))]
        futures = [self._pool.submit(self._fetch, rec, mirror, k) for k in missing]
        for f in futures:
            f.result()
        return mirror

    @contextmanager
    def staging(self, name: str, durable: bool = True) -> Iterator[tuple[str, Callable[..., None]]]:  # type: ignore[override]
        """Yield ``(local dir, commit)``.  The upload marker is PUT first, before any object of
        the upload; ``commit(extra_objects)`` uploads the directory (``extra_objects``: what
        other processes uploaded under the same token, see :meth:`join_staging`) and creates
        the commit record.  Leaving without a commit deletes the upload and its marker."""
        token = secrets.token_hex(12)
        tmp = os.path.join(self._cache, ".staging", f"{name}.{token}")
        data, marker = f"{name}/{token}", self._marker_key(name, token)
        os.makedirs(tmp)
        committed, unknown = False, False
        lease = _Lease(self, name, token, self.upload_lease)
        upload: _Upload | None = None

        def commit(extra_objects: dict[str, list[int]] | None = None) -> None:
            nonlocal committed, unknown
            assert upload is not None
            try:
                self._commit(name, token, tmp, extra_objects or {}, lease, upload)
            except _OutcomeUnknown:
                unknown = True
                raise
            except StoreUnavailableError as e:  # a fault that outlasted the retries: name the save
                raise CheckpointWriteError(f"saving checkpoint {name!r} failed, nothing was committed: {e}") from e
            committed = True

        try:
            lease.acquire()  # the marker before any object of the upload
            upload = self._uploads[tmp] = _Upload(self, name, tmp, data, self._base_record(name))
            yield tmp, commit
        finally:
            if upload is not None:
                upload.wait()  # no PUT of the upload lands after the cleanup below
                del self._uploads[tmp]
            lease.release()  # no renewal lands after the marker's DELETE below
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                if not committed and not unknown:
                    self._delete_prefix(data + "/")
                if not unknown:
                    self._delete_keys([marker])  # after a commit: harmless if left, cleanup removes it
            except Exception:
                pass  # left to cleanup_stale: the marker's lease says when

    def staging_ref(self, tmp: str) -> str:
        return os.path.basename(tmp).rsplit(".", 1)[1]

    @contextmanager
    def join_staging(self, name: str, ref: str) -> Iterator[tuple[str, Callable[[], dict[str, list[int]]]]]:  # type: ignore[override]
        """Another process's part of an upload (multi-process saves): yield ``(empty local dir,
        finish)``; ``finish()`` PUTs the files written there under the upload's token and returns
        ``{key: [size, crc32c]}`` for the committing process's :meth:`staging` ``commit``."""
        if not (isinstance(ref, str) and _TOKEN_RE.match(ref)):
            raise CheckpointWriteError(f"saving checkpoint {name!r}: {ref!r} is not an upload token")
        os.makedirs(os.path.join(self._cache, ".staging"), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"{name}.{ref}.", dir=os.path.join(self._cache, ".staging"))
        upload = self._uploads[tmp] = _Upload(self, name, tmp, f"{name}/{ref}", self._base_record(name))
        try:
            yield tmp, partial(self._upload_files, upload, root=False)
        finally:
            upload.wait()
            del self._uploads[tmp]
            shutil.rmtree(tmp, ignore_errors=True)

    def sink(self, tmp: str) -> Sink | None:
        """Chunk files of a save go straight from memory into PUTs (see :class:`_Upload`)."""
        upload = self._uploads.get(tmp)
        return upload.send if upload is not None else None

    def _commit(
        self, name: str, token: str, tmp: str, extra_objects: dict[str, list[int]], lease: _Lease, upload: _Upload
    ) -> None:
        # no existence check here: the manager checked before writing, and the record's
        # conditional PUT settles any race (a HEAD here would cost a request and prove nothing)
        data, marker = f"{name}/{token}", self._marker_key(name, token)
        if "zarr.json" in extra_objects:
            raise CheckpointWriteError(f"saving checkpoint {name!r}: only the committing process writes the root")
        objects = {**extra_objects, **self._upload_files(upload)}
        record = {
            "format": S.COMMIT_RECORD_FORMAT,
            "format_version": S.COMMIT_RECORD_VERSION,
            "checkpoint_id": name,
            "token": token,
            "data": data,
            "committed_at": _iso(time.time()),
            "objects": objects,
        }
        body = json.dumps(record, separators=(",", ":")).encode()
        try:  # what readers will check, checked before it is published (other processes' entries too)
            _parse_record(body, name, f"{self.root_url}/{self._record_key(name)}")
        except CheckpointError as e:
            raise CheckpointWriteError(f"saving checkpoint {name!r}: {e}") from None
        lost = (
            f"saving checkpoint {name!r}: the upload outlived its lease ({self.upload_lease:g} s, not renewed in "
            "time) and another manager's cleanup may remove it; nothing was committed"
        )
        if lease.lost or time.time() >= lease.expires or not self._head(marker):
            raise CheckpointWriteError(lost + (f" ({lease.lost})" if lease.lost else ""))
        self._put_record(name, token, body)
        lease.release()  # no renewal in flight from here on: what the marker shows now stays true
        if lease.lost or ((lease.unsure or time.time() >= lease.expires) and not self._head(marker)):
            # the lease may have run out before the record landed: a cleaner may have judged the
            # upload abandoned (marker, then no record, then the objects) meanwhile; and after a
            # late renewal the marker proves nothing.  Take the record back rather than leave it
            # naming objects that may be deleted: readers meanwhile saw objects go missing (an
            # error), never wrong bytes.
            try:
                rec = self._record(name)
                if rec is not None and rec["token"] == token:
                    self._delete_keys([self._record_key(name)])
            except CheckpointError as e:
                raise _OutcomeUnknown(f"{lost}; taking the commit record back failed: {e}") from e
            raise CheckpointWriteError(lost + "; its commit record was taken back")
        m = S.CHECKPOINT_ID_RE.match(name)
        if m is not None:
            self._last_records[m.group("run")] = record

    def _upload_files(self, upload: _Upload, root: bool = True) -> dict[str, list]:
        """Finish ``upload``: wait for the chunks sent while the group was written, PUT every
        file written under its staging directory (the metadata: in parallel, the root
        zarr.json last, required when ``root``) and return ``{key: [size, crc32c, sha256]}``."""
        keys = []
        for b, _dirs, files in os.walk(upload.tmp):
            rel = os.path.relpath(b, upload.tmp)
            keys += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files]

        def put(key: str) -> None:
            with open(os.path.join(upload.tmp, key), "rb") as f:
                upload.put(key, f.read())

        upload.check()  # a chunk that failed: nothing more to send
        futures = [self._pool.submit(put, k) for k in sorted(keys) if k != "zarr.json"]
        wait(futures)  # all finished (or failed) before any cleanup deletes the prefix
        for f in futures:
            f.result()
        upload.wait(check=True)
        if root:
            put("zarr.json")
        elif "zarr.json" in keys:
            raise CheckpointWriteError(f"{upload.data}: only the committing process writes the root zarr.json")
        self.last_upload = dict(upload.stats)
        return dict(upload.objects)

    def _base_record(self, name: str) -> dict | None:
        """The commit record of the run's latest other checkpoint (for an incremental save):
        the one this store committed last for the run while it is still there (the usual case:
        one manager saving a run), else found by listing the records."""
        m = S.CHECKPOINT_ID_RE.match(name)
        if m is None:
            return None
        last = self._last_records.get(m.group("run"))
        if last is not None and last["checkpoint_id"] != name and self._head(self._record_key(last["checkpoint_id"])):
            return last  # if it was re-created meanwhile, its copies fail and the chunks are PUT
        ids = [
            (int(x.group("it")), n)
            for n in self.names()
            if n != name and (x := S.CHECKPOINT_ID_RE.match(n)) and x.group("run") == m.group("run")
        ]
        if not ids:
            return None
        try:
            return self._record(max(ids)[1])
        except CheckpointError:
            return None  # deleted or damaged meanwhile: no base, every object is PUT

    def _put_record(self, name: str, token: str, body: bytes) -> None:
        """Create the commit record; when the PUT's outcome is unclear (a 412/409 after a retry
        of a PUT that landed, or a transport error), the record itself says who committed."""
        for attempt in range(TRANSPORT_RETRIES + 1):
            try:
                self._put(self._record_key(name), body, mode="create")
                return
            except _Exists:
                failure: BaseException | None = None
            except StoreUnavailableError as e:
                failure = e
            try:
                rec = self._record(name)
            except (CheckpointError, OSError) as e:
                rec, failure = None, failure or e
            if rec is not None and rec["token"] == token:
                return  # this writer's PUT landed
            if rec is not None:
                raise CheckpointExistsError(
                    f"checkpoint {name!r} already exists in {self} (committed by another writer)"
                )
            # none there after a failure obstore did not retry (a connection reset mid-PUT): PUT
            # it again.  Safe even if the first is still in flight: both are create-only and name
            # this upload, so whichever lands first is the record and the other gets 412
            if failure is None or _retried(failure) or attempt == TRANSPORT_RETRIES:
                break
            time.sleep(_BACKOFF * 2**attempt)
        # no record, and an error that may hide a PUT still landing: keep the upload (and its
        # marker), so that cleanup decides after the lease, by the record's token
        raise _OutcomeUnknown(
            f"saving checkpoint {name!r}: the commit record's PUT failed ({failure}); it may still land: "
            f"the upload is kept until its lease ({self.upload_lease:g} s) expires"
        ) from failure

    def delete(self, name: str) -> bool:
        if not (S.is_checkpoint_id(name) and self._head(self._record_key(name))):
            return False
        try:
            rec: dict | None = self._record(name)
        except CheckpointError:
            rec = None  # a damaged record: removed all the same; its data is left to cleanup
        if rec is not None:
            # a marker first: if this delete dies between the record and the objects, cleanup
            # still finds them by it, even once the id is committed again (with another token)
            marker, now = self._marker_key(name, rec["token"]), time.time()
            expires = now + min(self.upload_lease, DELETE_LEASE)
            body = {"checkpoint_id": name, "token": rec["token"], "host": socket.gethostname(), "pid": os.getpid()}
            body |= {"started_at": _iso(now), "expires_at": _iso(expires), "expires_at_unix": expires}
            self._put(marker, json.dumps(body).encode())
        self._delete_keys([self._record_key(name)])  # the checkpoint is gone from here on
        if rec is not None:
            self._delete_prefix(rec["data"] + "/")
            self._delete_keys([marker])
            mirror = os.path.join(self._cache, f"{name}.{rec['token']}")
            with self._lock:
                self._mirrors.pop(mirror, None)
                self._recs.pop(mirror, None)
            shutil.rmtree(mirror, ignore_errors=True)
        return True

    def _record_or_none(self, name: str) -> dict | None:
        """The record, or None when there is none or it cannot be read (cleanup must go on)."""
        try:
            return self._record(name)
        except CheckpointError as e:
            if isinstance(e, StoreUnavailableError):
                raise
            warnings.warn(f"{self}: skipping {name!r} in cleanup: {e}", CheckpointWarning, stacklevel=3)
            return None

    def _try_delete(self, what: str, fn: Callable[[], None]) -> bool:
        """A cleanup deletion; refused (read-only credentials) is a warning, not a failure to open."""
        try:
            fn()
        except StoreUnavailableError as e:
            warnings.warn(f"{self}: cleanup could not delete {what}: {e}", CheckpointWarning, stacklevel=3)
            return False
        return True

    def cleanup_stale(self) -> int:
        """Remove uploads whose lease expired without a commit, and data no record or
        marker owns (a delete interrupted after its record went); returns how many."""
        now, removed = time.time(), 0
        tops = [n for n in self._subdirs(None) if S.is_checkpoint_id(n)]
        committed = set(self.names())
        for o in self._list(S.UPLOADS_PREFIX + "/"):
            parts = o["path"].split("/")
            if len(parts) != 3 or not parts[2].endswith(".json"):
                continue
            name, token = parts[1], parts[2][: -len(".json")]
            if not (S.is_checkpoint_id(name) and _TOKEN_RE.match(token)):
                continue  # not a marker this package writes: never acted on
            try:
                expires = self._marker_expiry(o)
            except _Missing:
                continue  # finished meanwhile
            if expires > now:
                continue  # a live upload
            # the marker goes first: a writer that overran its lease then fails its check before
            # the record; the record is read afresh, after that, to decide about the data
            if not self._try_delete(o["path"], partial(self._delete_keys, [o["path"]])):
                continue
            rec = self._record_or_none(name)
            if (rec is None or rec["token"] != token) and self._try_delete(
                f"{name}/{token}/", partial(self._delete_prefix, f"{name}/{token}/")
            ):
                removed += 1
        for name in tops:
            if name in committed:
                continue
            for token in self._subdirs(name):
                # the marker of an upload precedes its first object: none now means none ever will be
                if not _TOKEN_RE.match(token) or self._head(self._marker_key(name, token)):
                    continue
                rec = self._record_or_none(name)
                if rec is not None and rec["token"] == token:
                    continue
                if self._try_delete(f"{name}/{token}/", partial(self._delete_prefix, f"{name}/{token}/")):
                    removed += 1
        return removed

    def _marker_expiry(self, o: dict) -> float:
        """A listed marker's ``expires_at_unix``; read twice before calling it unreadable (a
        body cut short on the way is not damage), then its age against the default lease."""
        for attempt in (1, 2):
            try:
                return float(json.loads(self._get(o["path"], 1 << 16))["expires_at_unix"])
            except (ValueError, KeyError, TypeError, RecursionError, CheckpointFormatError):
                if attempt == 2:
                    break
        return o["last_modified"].timestamp() + DEFAULT_UPLOAD_LEASE

    def files(self, name: str) -> list[tuple[tuple, int, int]]:
        """Objects are never shared (no links in an object store): sizes from the record."""
        rec = self._record(name) if S.is_checkpoint_id(name) else None
        if rec is None:
            return []
        return [((rec["data"], k), meta[0], 1) for k, meta in rec["objects"].items()]

    def tag_index(self, durable: bool = True) -> ObjectTagIndex:
        return ObjectTagIndex(self)


class _Upload:
    """The objects of one upload (``<id>/<token>/`` under the store's prefix): chunk files sent
    by the writer while it writes the group (:meth:`send`, the store's ``sink``: from memory,
    never written locally), then the files written into its staging directory ``tmp`` (the
    metadata, at commit).  A chunk whose size, CRC32C and SHA-256 equal the same key's in
    ``base`` (the commit record of the run's previous checkpoint) is copied server-side from
    it instead of PUT (an incremental save).  At most ``2 * workers`` sent chunks are in
    flight: a writer thread waits for a slot, so memory stays bounded while PUTs lag."""

    def __init__(self, store: ObjectStore, name: str, tmp: str, data: str, base: dict | None) -> None:
        self.store, self.name, self.tmp, self.data, self.base = store, name, tmp, data, base
        self.objects: dict[str, list] = {}
        self.stats = {"objects_put": 0, "objects_copied": 0, "bytes_put": 0, "bytes_copied": 0}
        self._futures: list[Future] = []
        self._failed: BaseException | None = None  # the first sent chunk that failed
        self._slots = threading.BoundedSemaphore(2 * store._workers)
        self._lock = threading.Lock()

    def put(self, key: str, b: bytes | memoryview) -> int:
        """PUT (or copy from the base) one object of the upload now; returns the bytes PUT."""
        meta = [len(b), _crc.crc32c(b), hashlib.sha256(b).hexdigest()]
        copied, sent = False, 0
        if self.base is not None and self.base["objects"].get(key) == meta and not key.endswith("zarr.json"):
            src, dst = f"{self.base['data']}/{key}", f"{self.data}/{key}"
            try:
                self.store._call(f"COPY {key}", self.store._obs.copy, src, dst)
                copied = True
            except (_Missing, StoreUnavailableError):
                pass  # the base was deleted meanwhile, or the store cannot copy: PUT it
        if not copied:
            self.store._put(f"{self.data}/{key}", b)
            sent = len(b)
        with self._lock:
            self.objects[key] = meta
            self.stats["objects_copied" if copied else "objects_put"] += 1
            self.stats["bytes_copied" if copied else "bytes_put"] += len(b)
        return sent

    def send(self, path: str, bufs: list) -> int:
        """The sink: one chunk file (``path`` under ``tmp``) from the writer, PUT in the
        store's pool while the writer goes on; a failure is raised by the next send or at
        commit.  Returns its size (what a save counts as written)."""
        self.check()
        key = os.path.relpath(path, self.tmp).replace(os.sep, "/")
        body = b"".join(bufs)  # the chunk and its CRC as one body (the only copy, 4 MiB at most)
        self._slots.acquire()
        try:
            self.check()  # (a failure while this thread waited for a slot)
            future = self.store._pool.submit(self.put, key, body)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._done)
        with self._lock:
            self._futures.append(future)
        return len(body)

    def _done(self, future: Future) -> None:
        self._slots.release()
        e = future.exception()
        if e is not None:
            with self._lock:
                self._failed = self._failed or e

    def check(self) -> None:
        """Raise the first failure of a sent chunk, if one has failed by now."""
        if self._failed is not None:
            e = self._failed
            raise CheckpointWriteError(f"saving checkpoint {self.name!r} failed, nothing was committed: {e}") from e

    def wait(self, check: bool = False) -> None:
        """Wait for every sent chunk; ``check``: raise the first failure."""
        with self._lock:
            futures = list(self._futures)
        wait(futures)
        if check:  # from the futures themselves: their done-callbacks may not have run yet
            for f in futures:
                e = f.exception()
                if e is not None:
                    raise CheckpointWriteError(
                        f"saving checkpoint {self.name!r} failed, nothing was committed: {e}"
                    ) from e


class _Lease:
    """An upload's lease on its objects: its marker (spec/FORMAT.md 3.2, step 2), PUT first and
    re-PUT with a later expiry, from a background thread, whenever half of the lease has run.

    A cleaner removes an upload once the marker it reads has expired, marker first.  A renewal
    therefore counts only when it was answered before the expiry it extends: one answered
    later may have landed after a cleaner removed the marker (and began on the objects), so
    from then on the lease is lost, is never renewed again (that would bring back a marker for
    objects being deleted), and the save fails before its commit record.  A renewal that
    failed may still land later with an older expiry, so after one the commit checks the
    marker again.  Writers' and cleaners' clocks are assumed to agree to well
    within half a lease, as the expiry itself assumes."""

    def __init__(self, store: ObjectStore, name: str, token: str, seconds: float) -> None:
        self.store, self.key, self.seconds = store, store._marker_key(name, token), seconds
        self.body = {"checkpoint_id": name, "token": token, "host": socket.gethostname(), "pid": os.getpid()}
        self.expires = 0.0
        self.lost: str | None = None
        self.renewals = 0
        self.unsure = False
        """A renewal failed: it may still land, late, with an older expiry."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self) -> float:
        """PUT the marker with an expiry counted from now; return it once the PUT is answered
        in time, or record the lease as lost."""
        sent = time.time()
        body = {
            **self.body,
            "started_at": self.body.setdefault("started_at", _iso(sent)),
            "expires_at": _iso(sent + self.seconds),
            "expires_at_unix": sent + self.seconds,
        }
        self.store._put(self.key, json.dumps(body).encode())
        if self.expires and time.time() >= self.expires:
            self.lost = f"a renewal was answered {time.time() - self.expires:.1f} s after the lease expired"
        return sent + self.seconds

    def acquire(self) -> None:
        self.expires = self._put()
        self._thread = threading.Thread(target=self._renew, name="cfs-s3-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while self.lost is None:
            due = self.expires - self.seconds / 2 - time.time()
            if self._stop.wait(max(due, 0.0)):
                return
            try:
                expires = self._put()
            except CheckpointError as e:  # retried within the retry config already; try again while it holds
                self.unsure = True
                if time.time() >= self.expires:
                    self.lost = f"renewing it failed until it expired: {e}"
                elif self._stop.wait(min(1.0, self.seconds / 8)):
                    return
                continue
            if self.lost is None:
                self.expires = expires
                self.renewals += 1

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _Mirror:
    """A committed checkpoint's local mirror (``_format.arrays.Mirror``): metadata fetched into
    files (read several times), chunks read into memory (read once, by a load or a slice)."""

    def __init__(self, store: ObjectStore, rec: dict, root: str) -> None:
        self.store, self.rec, self.root = store, rec, root

    def fetch(self, rel: str) -> bool:
        return self.store._fetch(self.rec, self.root, rel)

    def read(self, rel: str) -> memoryview | None:
        return self.store._read_object(self.rec, rel)

    def size(self, rel: str) -> int | None:
        meta = self.rec["objects"].get(rel)
        return None if meta is None else meta[0]

    def digest(self, rel: str) -> str | None:
        """The object's SHA-256 (hex) from the commit record, without fetching it: what tells
        a server-side copy of an unchanged chunk from new bytes (``CheckpointView.chunk_identity``)."""
        meta = self.rec["objects"].get(rel)
        return meta[2] if meta is not None and len(meta) > 2 else None

    def prefetch(self, prefix: str) -> None:
        if threading.current_thread().name.startswith(_POOL_NAME):
            return  # waiting on the pool from one of its own threads could wait forever
        keys = [k for k in self.rec["objects"] if k.startswith(prefix) and k.endswith("/zarr.json")]
        keys = [k for k in keys if k != prefix + "zarr.json"]  # the arrays' (a lazy open skips the group's)
        keys = [k for k in keys if not os.path.exists(os.path.join(self.root, k))]
        wait([self.store._pool.submit(self.fetch, k) for k in keys])  # errors: raised by the reads that follow


class ObjectTagIndex:
    """Tags in an object store: ``.cfs-tags/<checkpoint_id>/<tag>`` empty objects (the
    layout of the directory store's tags; spec/FORMAT.md, "Tags")."""

    def __init__(self, store: ObjectStore) -> None:
        self.s = store

    def _key(self, checkpoint_id: str, tag: str = "") -> str:
        return f"{S.TAGS_DIR}/{checkpoint_id}/{tag}"

    def add(self, checkpoint_id: str, tag: str) -> bool:
        S.validate_tag(tag)
        try:
            self.s._put(self._key(checkpoint_id, tag), b"", mode="create")
        except _Exists:
            return False
        return True

    def remove(self, checkpoint_id: str, tag: str) -> bool:
        S.validate_tag(tag)
        if not self.s._head(self._key(checkpoint_id, tag)):
            return False
        self.s._delete_keys([self._key(checkpoint_id, tag)])
        return True

    def of(self, checkpoint_id: str) -> frozenset[str]:
        return frozenset(
            o["path"].rsplit("/", 1)[-1] for o in self.s._list(self._key(checkpoint_id)) if _valid_tag(o["path"])
        )

    def all(self) -> dict[str, frozenset[str]]:
        out: dict[str, set[str]] = {}
        for o in self.s._list(S.TAGS_DIR + "/"):
            parts = o["path"].split("/")
            if len(parts) == 3 and S.is_checkpoint_id(parts[1]) and _valid_tag(parts[2]):
                out.setdefault(parts[1], set()).add(parts[2])
        return {k: frozenset(v) for k, v in out.items()}

    def drop(self, checkpoint_id: str) -> None:
        self.s._delete_prefix(self._key(checkpoint_id))


def _valid_tag(path: str) -> bool:
    try:
        S.validate_tag(path.rsplit("/", 1)[-1])
    except ValueError:
        return False
    return True


_CACHE_PREFIX = "cfs-s3-"


def _remove_dead_caches() -> None:
    """Remove the local mirrors and staging areas that killed processes left in the temp
    directory (``cfs-s3-<pid>-*``, ``<pid>`` no longer running): a process removes its own
    at exit, a SIGKILLed one cannot.  On Windows they stay: no process is probed there
    (``_platform.pid_alive``)."""
    tmp = tempfile.gettempdir()
    try:
        names = os.listdir(tmp)
    except OSError:
        return
    for n in names:
        m = re.match(rf"^{_CACHE_PREFIX}(\d+)-[A-Za-z0-9_]+$", n)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        if not _platform.pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(tmp, n), ignore_errors=True)


def _close(cache: str, pool: ThreadPoolExecutor) -> None:
    pool.shutdown(wait=False)
    shutil.rmtree(cache, ignore_errors=True)
