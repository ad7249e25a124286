"""Every error the library raises on purpose.

One base class, :class:`ComputableFlowsError`; each subclass also inherits the builtin
exception that callers already catch (``FileNotFoundError``, ``ValueError`` ...),
so ``except FileNotFoundError`` keeps working for code that does not know us.
"""

from __future__ import annotations

__all__ = [
    "ComputableFlowsError",
    "FlowSpecError",
    "FlowDivergedError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "CheckpointCorruptError",
    "CheckpointFormatError",
    "InvalidRunIdError",
    "InvalidTagError",
    "TargetMismatchError",
    "UnsupportedLeafError",
    "MetadataError",
    "CheckpointWriteError",
    "StoreUnavailableError",
    "DistributedSaveError",
    "CheckpointTooLargeError",
    "InvalidIterationError",
    "CheckpointWarning",
    "MissingDependencyError",
    "ExportError",
]


class ComputableFlowsError(Exception):
    """Base class of every error raised by computable_flows_shim on purpose."""


class FlowSpecError(ComputableFlowsError, ValueError):
    """Raised when a flow spec (the plain-data ``flow_config``) is malformed: an unknown
    term or operator kind, shapes that do not fit, a bad parameter.  Names the field."""


class FlowDivergedError(ComputableFlowsError, FloatingPointError):
    """Raised when a flow's energy becomes NaN or infinite.  The bad state is not
    checkpointed; ``last_good_checkpoint`` names the newest checkpoint saved before."""

    def __init__(self, message: str, iteration: int, last_good_checkpoint: str | None) -> None:
        super().__init__(message)
        self.iteration = iteration
        self.last_good_checkpoint = last_good_checkpoint


class CheckpointError(ComputableFlowsError):
    """Base class of the checkpoint errors (store, format, load, save)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """Raised when a checkpoint id names no committed checkpoint in the store."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """Raised when a save would replace a committed checkpoint (ids are never reused)."""


class CheckpointCorruptError(CheckpointError, OSError):
    """Raised when stored bytes fail a check: a checksum mismatch, a missing or
    truncated chunk file, or metadata that does not parse.  The message names the
    checkpoint, the leaf (array path) and the chunk."""


class CheckpointFormatError(CheckpointError, ValueError):
    """Raised when a checkpoint is well-formed JSON/bytes but not something this
    version may read: another format name, a newer format version, an unknown
    data type or codec, a path that escapes the checkpoint (see spec/FORMAT.md,
    "What a reader must refuse")."""


class InvalidRunIdError(CheckpointError, ValueError):
    """Raised before anything is written when a run id could escape the store or is
    not a portable file name."""


class InvalidTagError(CheckpointError, ValueError):
    """Raised before anything is written when a tag is not a portable file name
    (tags are files under ``.cfs-tags/<checkpoint_id>/``, so the run id rule applies)."""


class TargetMismatchError(CheckpointError, ValueError):
    """Raised when a restore ``target`` does not match the stored tree: a leaf is
    missing or extra, or its shape/dtype differs.  Names the key path."""


class UnsupportedLeafError(CheckpointError, TypeError):
    """Raised at save time for a pytree leaf or dict key the format cannot store
    (e.g. an arbitrary Python object); names the key path."""


class MetadataError(CheckpointError, TypeError):
    """Raised at save time when ``flow_config``, ``certificates``, ``metadata`` or
    the telemetry history cannot be represented as the JSON/columns the format
    stores; names the offending key."""


class CheckpointWriteError(CheckpointError, OSError):
    """Raised when writing a checkpoint fails (ENOSPC, EIO, ...).  Nothing is
    committed and the temporary is removed; ``__cause__`` holds the OS error."""


class StoreUnavailableError(CheckpointError, OSError):
    """Raised when an object store cannot be reached or refuses a request that is not about
    one checkpoint (network down, bad credentials, missing bucket); nothing was committed."""


class DistributedSaveError(CheckpointWriteError):
    """Raised by a multi-process save (``jax.process_count() > 1``) on the processes that
    survive when another process failed, was killed or did not reach the commit within the
    save's ``distributed_timeout``: nothing was committed (the staging directory or upload
    is removed by process 0, or by stale cleanup if process 0 died: at once for a directory
    store, once the upload's lease has expired for an object store).  The message names the process
    and the phase; a process whose own save raised re-raises its own error instead."""


class CheckpointTooLargeError(CheckpointError, MemoryError):
    """Raised when restoring an array needs more memory than can be allocated.  A shape
    that its chunk files cannot hold is refused before allocating, as damage
    (CheckpointCorruptError), so this means the files really are that large."""


class InvalidIterationError(CheckpointError, ValueError):
    """Raised before anything is written when an iteration is not a non-negative integer
    (it is part of the checkpoint id)."""


class CheckpointWarning(UserWarning):
    """Warned when listing skips an uncommitted or damaged entry in a store."""


class MissingDependencyError(ComputableFlowsError, ImportError):
    """Raised when an analysis feature needs an optional package that is not installed
    (dask for lazy views, matplotlib for plots, h5py for HDF5 export); names the extra
    to install (``computable-flows-shim[analysis]``)."""


class ExportError(ComputableFlowsError, ValueError):
    """Raised by ``export_checkpoint`` (``cfs export``) before anything is written when
    the output's format is not known from its suffix (``.h5``, ``.hdf5``, ``.npz``) or
    the output file already exists."""
