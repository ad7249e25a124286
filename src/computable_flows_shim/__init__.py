"""computable-flows-shim: checkpoints for long-running JAX optimization flows.

Each checkpoint is a plain Zarr v3 group (see spec/FORMAT.md) that zarr-python,
tensorstore, xarray and dask open without this package.
"""

from ._manager import CheckpointInfo, CheckpointManager, VerifyReport
from ._spec import FORMAT_NAME, FORMAT_VERSION
from ._store import LocalDirectoryStore, Store
from ._types import CheckpointId, PyTree, RunId, Step
from ._view import CheckpointView, LazyArray
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CheckpointWriteError,
    InvalidRunIdError,
    MetadataError,
    TargetMismatchError,
    UnsupportedLeafError,
)

__version__ = "0.1.0"

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointId",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointView",
    "CheckpointWarning",
    "CheckpointWriteError",
    "InvalidRunIdError",
    "LazyArray",
    "LocalDirectoryStore",
    "MetadataError",
    "PyTree",
    "RunId",
    "Step",
    "Store",
    "TargetMismatchError",
    "UnsupportedLeafError",
    "VerifyReport",
    "__version__",
]
