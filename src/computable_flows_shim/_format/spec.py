"""The on-disk names of the format (versions 1, 2 and 3).  spec/FORMAT.md documents every
name here; nothing else in the package spells an on-disk name."""

from __future__ import annotations

import re

from computable_flows_shim.errors import InvalidIterationError, InvalidRunIdError, InvalidTagError

FORMAT_NAME = "computable-flows-shim.checkpoint"
FORMAT_VERSION = 3
"""The newest format version this package reads and writes."""
FORMAT_VERSION_UNCOMPRESSED = 1
"""What a checkpoint with neither a compressed array nor packed leaves is written as: byte for
byte what version 1 writers wrote, so that readers of version 1 keep reading it."""
FORMAT_VERSION_COMPRESSED = 2
"""What a checkpoint with a compressed array (a ``zstd`` or ``blosc`` codec, spec/FORMAT.md
section 8.1) is written as: a version 1 reader refuses it by its version, not halfway through."""
FORMAT_VERSION_PACKED = 3
"""What a checkpoint with packed leaves (spec/FORMAT.md section 8.2) is written as: small leaves
stored together in one array per data type, which readers of versions 1 and 2 would not find."""

# Group attributes of a checkpoint (spec/FORMAT.md, "Checkpoint attributes").
A_FORMAT = "format"
A_FORMAT_VERSION = "format_version"
A_CHECKPOINT_ID = "checkpoint_id"
A_RUN_ID = "run_id"
A_ITERATION = "iteration"
A_CREATED_AT = "created_at"
A_FLOW_CONFIG = "flow_config"
A_CERTIFICATES = "certificates"
A_METADATA = "metadata"
A_LINEAGE = "lineage"
A_TELEMETRY_SUMMARY = "telemetry_summary"
A_TREE = "pytree"
# Metadata checksums (spec/FORMAT.md, "Metadata checksums"): CRC32C of every other zarr.json
# of the checkpoint, and of the root zarr.json itself (its last member).
A_METADATA_CRCS = "cfs_metadata_crc32c"
A_ROOT_CRC = "cfs_root_crc32c"

# Array attributes (spec/FORMAT.md, "Arrays").
AA_CRC32C = "cfs_chunk_crc32c"
AA_KEY_IMPL = "cfs_prng_key_impl"

# Group names inside a checkpoint.
STATE_GROUP = "state"
TELEMETRY_GROUP = "telemetry"

# Packed leaves (spec/FORMAT.md 8.2): small leaves stored in one 1-D array per data type,
# ``packed/<data type name>`` (a group beside ``state/``), each leaf's place in its pytree
# node's ``packed`` member.
PACKED_GROUP = "packed"
PACK_ALIGNMENT = 64
"""A packed leaf starts at a multiple of this many bytes of its pack (zeros in between)."""
TN_PACKED = "packed"
TN_PACK_ARRAY = "array"
TN_PACK_OFFSET = "offset"
TN_PACK_SHAPE = "shape"
TN_PACK_CRC32C = "crc32c"

# Telemetry: the sample dimension is named after the iteration column so that
# xarray makes it the index coordinate; events have their own dimension.
T_SAMPLE_DIM = "iter"
T_EVENT_DIM = "event"
T_EVENT_ITER = "event_iter"
T_EVENT_TYPE = "event_type"
T_EVENT_PAYLOAD = "event_payload"

# Chunk encoding: every chunk is the C-order little-endian bytes of the chunk (compressed by a
# "zstd" or "blosc" codec in format v2: _format/codecs.py) followed by a 4-byte little-endian
# CRC32C of those stored bytes (the Zarr v3 "crc32c" codec).
CHUNK_SEPARATOR = "."
CRC_BYTES = 4

# Store layout (spec/FORMAT.md, "Store layout and commit protocol").
STAGING_DIR = ".cfs-staging"
TRASH_DIR = ".cfs-trash"
# Tags (spec/FORMAT.md, "Tags"): ``.cfs-tags/<checkpoint_id>/<tag>`` empty files, kept
# outside the checkpoint because a committed checkpoint is never written into.
TAGS_DIR = ".cfs-tags"
# Object stores (spec/FORMAT.md, "Object stores"): a checkpoint's objects live under
# ``<checkpoint_id>/<upload token>/``; it exists exactly when its commit record does.
COMMITS_PREFIX = ".cfs-commits"
UPLOADS_PREFIX = ".cfs-uploads"
COMMIT_RECORD_FORMAT = "computable-flows-shim.commit"
COMMIT_RECORD_VERSION = 1
CHECKPOINT_ID_RE = re.compile(r"^(?P<run>[A-Za-z0-9][A-Za-z0-9._-]{0,127})-i(?P<it>[0-9]{12,})$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ITERATION_DIGITS = 12


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is a portable file name, else raise InvalidRunIdError.

    Allowed: 1-128 characters from ``A-Z a-z 0-9 . _ -``, starting with a letter or
    digit (so never ``.``, ``..``, a hidden name, a separator or a control character).
    """
    if not isinstance(run_id, str):
        raise InvalidRunIdError(f"run_id must be a str, got {type(run_id).__name__}: {run_id!r}")
    if not _RUN_ID_RE.match(run_id):
        raise InvalidRunIdError(
            f"invalid run_id {run_id!r}: expected 1-128 characters from A-Z a-z 0-9 '.' '_' '-', "
            "starting with a letter or digit (no path separators, '..', spaces or control characters)"
        )
    return run_id


def validate_tag(tag: object) -> str:
    """Return ``tag`` if it is a portable file name (the run id rule), else raise InvalidTagError:
    a tag is a file name under ``.cfs-tags/<checkpoint_id>/``."""
    if not isinstance(tag, str) or not _RUN_ID_RE.match(tag):
        raise InvalidTagError(
            f"invalid tag {tag!r}: expected 1-128 characters from A-Z a-z 0-9 '.' '_' '-', "
            "starting with a letter or digit"
        )
    return tag


def validate_iteration(iteration: object) -> int:
    import numbers

    if isinstance(iteration, bool) or not isinstance(iteration, numbers.Integral) or int(iteration) < 0:
        raise InvalidIterationError(f"iteration must be a non-negative int, got {iteration!r}")
    return int(iteration)


def make_checkpoint_id(run_id: str, iteration: int) -> str:
    """``<run_id>-i<iteration zero-padded to 12 digits>``: a portable file name that
    sorts by iteration within a run."""
    return f"{validate_run_id(run_id)}-i{validate_iteration(iteration):0{ITERATION_DIGITS}d}"


def is_checkpoint_id(name: str) -> bool:
    return bool(CHECKPOINT_ID_RE.match(name))
