"""The root ``zarr.json`` of a checkpoint: its bytes (the checkpoint attributes, with the
CRC32C of the document framed at its end and the CRC32C of every other metadata file,
spec/FORMAT.md section 6.1), and reading them back checked, cached per file identity."""

from __future__ import annotations

import json
import os
import re

import crc32c as _crc

from computable_flows_shim._format import spec as S
from computable_flows_shim._format.arrays import (
    Mirror,
    group_metadata,
    read_json_raw,
)
from computable_flows_shim.errors import (
    CheckpointCorruptError,
    CheckpointFormatError,
)


def dump_json(doc: dict) -> bytes:
    # compact: json's C encoder only runs without indent (10x faster on large consolidated docs)
    return json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")


def crc32c_of(data: bytes | memoryview) -> int:
    return _crc.crc32c(data)


_ROOT_CRC_SUFFIX = re.compile(b'"' + S.A_ROOT_CRC.encode() + b'":"([0-9a-f]{8})"}}')
_ROOT_CRC_SUFFIX_LEN = len(S.A_ROOT_CRC) + 3 + 2 + 8 + 2
"""``"cfs_root_crc32c":"<8 hex digits>"}}``: how every checksummed root zarr.json ends."""


def root_bytes(attrs: dict, consolidated: dict | None) -> bytes:
    """The root zarr.json of a checkpoint: ``attributes`` is its last member and
    ``cfs_root_crc32c`` the last attribute, holding the CRC32C of every byte before that
    member (spec/FORMAT.md, "Metadata checksums").  ``attrs`` carries the CRC32C of
    every other zarr.json (``cfs_metadata_crc32c``), so all metadata is checksummed."""
    doc: dict = {"zarr_format": 3, "node_type": "group"}
    if consolidated is not None:
        doc["consolidated_metadata"] = group_metadata({}, consolidated)["consolidated_metadata"]
    doc["attributes"] = {k: v for k, v in attrs.items() if k != S.A_ROOT_CRC}
    body = dump_json(doc)
    head = body[:-2] + (b"," if doc["attributes"] else b"")
    return head + b'"%s":"%08x"}}' % (S.A_ROOT_CRC.encode(), crc32c_of(head))


def _check_root_crc(attrs: object, raw: bytes, where: str) -> dict[str, int] | None:
    """The checkpoint's metadata checksums (relative path -> CRC32C), after checking the
    root's own; None for a checkpoint written before checksums (it has neither)."""
    tail = _ROOT_CRC_SUFFIX.fullmatch(raw[-_ROOT_CRC_SUFFIX_LEN:])
    keys = (S.A_ROOT_CRC, S.A_METADATA_CRCS)
    if tail is None and not (isinstance(attrs, dict) and any(k in attrs for k in keys)):
        return None
    if tail is None:
        raise CheckpointCorruptError(f"{where}: root zarr.json does not end with its checksum {S.A_ROOT_CRC!r}")
    got, stored = crc32c_of(raw[:-_ROOT_CRC_SUFFIX_LEN]), int(tail.group(1), 16)
    if got != stored:
        raise CheckpointCorruptError(
            f"{where}: root zarr.json does not match its checksum (CRC32C {got:#010x}, stored {stored:#010x})"
        )
    crcs = attrs.get(S.A_METADATA_CRCS) if isinstance(attrs, dict) else None
    if not isinstance(crcs, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 32 and _metadata_key_ok(k)
        for k, v in crcs.items()
    ):
        raise CheckpointFormatError(f"{where}: {S.A_METADATA_CRCS!r} must map zarr.json paths to CRC32C values")
    return crcs


def _metadata_key_ok(key: str) -> bool:
    parts = key.split("/")
    return (
        len(parts) >= 2
        and parts[-1] == "zarr.json"
        and "\\" not in key
        and "\x00" not in key
        and not any(p in ("", ".", "..") for p in parts)
    )


_MISSING = object()
_ROOTS: dict[tuple, tuple[dict, dict[str, int] | None]] = {}
"""Checked root attributes by (path, device, inode, size, mtime, ctime) of the root zarr.json:
a committed checkpoint never changes, so every array read can check its metadata against
the root's checksums without reading the root again."""


def _root_key(path: str, st: os.stat_result) -> tuple:
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def metadata_crcs(dirpath: str, where: str, mirror: Mirror | None = None) -> dict[str, int] | None:
    """The checked metadata checksums of the checkpoint at ``dirpath`` (None: written before them)."""
    path = os.path.join(dirpath, "zarr.json")
    try:
        hit = _ROOTS.get(_root_key(path, os.lstat(path)), _MISSING)
    except OSError:
        hit = _MISSING
    if hit is not _MISSING:
        return hit[1]  # type: ignore[index]
    return _read_root(dirpath, where, mirror)[1]


def expected_crc(crcs: dict[str, int] | None, key: str, where: str) -> int | None:
    if crcs is None:
        return None
    crc = crcs.get(key)
    if crc is None:
        raise CheckpointCorruptError(f"{where}: {key} is not in the checkpoint's metadata checksums (added?)")
    return crc


def read_attrs(dirpath: str, where: str, mirror: Mirror | None = None) -> dict:
    """The checkpoint attributes, after checking format name and version and the root's checksum."""
    return _read_root(dirpath, where, mirror)[0]


def _read_root(dirpath: str, where: str, mirror: Mirror | None) -> tuple[dict, dict[str, int] | None]:
    path = os.path.join(dirpath, "zarr.json")
    doc, raw, st = read_json_raw(path, where, mirror)
    attrs, crcs = parse_root(doc, raw, where)
    if len(_ROOTS) > 256:
        _ROOTS.clear()
    _ROOTS[_root_key(path, st)] = (attrs, crcs)
    return attrs, crcs


def parse_root(doc: dict, raw: bytes, where: str) -> tuple[dict, dict[str, int] | None]:
    """Check a parsed root zarr.json (``raw``: its bytes); returns its attributes and metadata checksums."""
    a = doc.get("attributes")
    if isinstance(a, dict) and a.get(S.A_FORMAT) == S.FORMAT_NAME:  # a newer version may checksum differently
        v = a.get(S.A_FORMAT_VERSION)
        if isinstance(v, int) and not isinstance(v, bool) and v > S.FORMAT_VERSION:
            raise CheckpointFormatError(
                f"{where}: format_version {v} is newer than this library reads ({S.FORMAT_VERSION}); upgrade"
            )
    crcs = _check_root_crc(a, raw, where)
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise CheckpointFormatError(f"{where}: root is not a Zarr v3 group")
    attrs = doc.get("attributes")
    if not isinstance(attrs, dict) or attrs.get(S.A_FORMAT) != S.FORMAT_NAME:
        raise CheckpointFormatError(f"{where}: not a {S.FORMAT_NAME} checkpoint")
    version = attrs.get(S.A_FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointFormatError(f"{where}: bad format_version {version!r}")
    if version > S.FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where}: format_version {version} is newer than this library reads ({S.FORMAT_VERSION}); upgrade"
        )
    for key, kind in ((S.A_RUN_ID, str), (S.A_CHECKPOINT_ID, str), (S.A_ITERATION, int), (S.A_TREE, dict)):
        if not isinstance(attrs.get(key), kind) or isinstance(attrs.get(key), bool):
            raise CheckpointFormatError(f"{where}: attribute {key!r} missing or not a {kind.__name__}")
    return attrs, crcs


__all__ = [
    "root_bytes",
    "parse_root",
    "read_attrs",
    "metadata_crcs",
    "expected_crc",
    "dump_json",
    "crc32c_of",
]
