"""computable-flows-shim: checkpoints for long-running JAX optimization flows.

Each checkpoint is a plain Zarr v3 group (see spec/FORMAT.md) that zarr-python,
tensorstore, xarray and dask open without this package.
"""

from ._certificates import compute_certificates
from ._diff import CheckpointDiff, LeafDiff, diff_checkpoints
from ._engine import FlowResult, resume_flow, run_flow
from ._examples import EXAMPLES, make_example
from ._export import export_checkpoint
from ._flow import Flow, build_flow
from ._lineage import RunInfo, format_run_tree, list_runs, open_run
from ._manager import CheckpointInfo, CheckpointManager, VerifyReport
from ._plot import plot_telemetry
from ._primitives import F_Dis, F_Multi, F_Proj, soft_threshold
from ._recorder import TelemetryRecorder
from ._retention import (
    AnyOf,
    KeepBest,
    KeepEvery,
    KeepLatest,
    KeepPerInterval,
    KeepTagged,
    RetentionDecision,
    RetentionPolicy,
    RetentionReport,
    any_of,
)
from ._s3 import ObjectStore
from ._spec import FORMAT_NAME, FORMAT_VERSION
from ._store import LocalDirectoryStore, Store
from ._types import CheckpointId, PyTree, RunId, Step
from ._usage import CheckpointUsage, DiskUsage, RunUsage
from ._view import (
    CheckpointView,
    LazyArray,
    LeafInfo,
    describe_leaves,
    lazy_array_to_dask,
    state_dataset,
    state_datatree,
)
from ._xarray import open_telemetry
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointTooLargeError,
    CheckpointWarning,
    CheckpointWriteError,
    ComputableFlowsError,
    DistributedSaveError,
    ExportError,
    FlowDivergedError,
    FlowSpecError,
    InvalidIterationError,
    InvalidRunIdError,
    InvalidTagError,
    MetadataError,
    MissingDependencyError,
    StoreUnavailableError,
    TargetMismatchError,
    UnsupportedLeafError,
)

__version__ = "0.1.0"

__all__ = [
    "EXAMPLES",
    "F_Dis",
    "F_Multi",
    "F_Proj",
    "Flow",
    "FlowDivergedError",
    "FlowResult",
    "FlowSpecError",
    "ComputableFlowsError",
    "TelemetryRecorder",
    "build_flow",
    "compute_certificates",
    "make_example",
    "resume_flow",
    "run_flow",
    "soft_threshold",
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
    "DistributedSaveError",
    "CheckpointTooLargeError",
    "StoreUnavailableError",
    "InvalidIterationError",
    "InvalidRunIdError",
    "LazyArray",
    "LocalDirectoryStore",
    "ObjectStore",
    "MetadataError",
    "PyTree",
    "RunId",
    "Step",
    "Store",
    "TargetMismatchError",
    "UnsupportedLeafError",
    "VerifyReport",
    "AnyOf",
    "CheckpointUsage",
    "DiskUsage",
    "InvalidTagError",
    "KeepBest",
    "KeepEvery",
    "KeepLatest",
    "KeepPerInterval",
    "KeepTagged",
    "RetentionDecision",
    "RetentionPolicy",
    "RetentionReport",
    "RunUsage",
    "any_of",
    # analysis and interop
    "CheckpointDiff",
    "ExportError",
    "LeafDiff",
    "LeafInfo",
    "MissingDependencyError",
    "RunInfo",
    "describe_leaves",
    "diff_checkpoints",
    "export_checkpoint",
    "format_run_tree",
    "lazy_array_to_dask",
    "list_runs",
    "open_run",
    "open_telemetry",
    "plot_telemetry",
    "state_dataset",
    "state_datatree",
    "__version__",
]
