"""computable-flows-shim: checkpoints for long-running JAX optimization flows.

Each checkpoint is a plain Zarr v3 group (see spec/FORMAT.md) that zarr-python,
tensorstore, xarray and dask open without this package.
"""

from computable_flows_shim._format.codecs import Compression
from computable_flows_shim._format.spec import FORMAT_NAME, FORMAT_VERSION
from computable_flows_shim._types import CheckpointId, PyTree, RunId, Step
from computable_flows_shim.analysis._convergence import distance_to, successive_change, telemetry_at_checkpoints
from computable_flows_shim.analysis._diff import CheckpointDiff, LeafDiff, diff_checkpoints
from computable_flows_shim.analysis._export import export_checkpoint
from computable_flows_shim.analysis._orbax import import_orbax
from computable_flows_shim.analysis._plot import plot_states, plot_telemetry
from computable_flows_shim.analysis._states import open_run_states
from computable_flows_shim.analysis._xarray import open_telemetry
from computable_flows_shim.checkpoints._lineage import RunInfo, format_run_tree, list_runs, open_run
from computable_flows_shim.checkpoints._manager import CheckpointInfo, CheckpointManager, VerifyReport
from computable_flows_shim.checkpoints._retention import (
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
from computable_flows_shim.checkpoints._view import (
    CheckpointView,
    LazyArray,
    LeafInfo,
    describe_leaves,
    lazy_array_to_dask,
    state_dataset,
    state_datatree,
)
from computable_flows_shim.errors import (
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
from computable_flows_shim.flow._certificates import compute_certificates
from computable_flows_shim.flow._engine import FlowResult, resume_flow, run_flow
from computable_flows_shim.flow._examples import EXAMPLES, make_example
from computable_flows_shim.flow._primitives import F_Dis, F_Multi, F_Proj, soft_threshold
from computable_flows_shim.flow._recorder import TelemetryRecorder
from computable_flows_shim.flow._spec import Flow, build_flow
from computable_flows_shim.store._base import Store
from computable_flows_shim.store._local import LocalDirectoryStore
from computable_flows_shim.store._s3 import ObjectStore
from computable_flows_shim.store._usage import CheckpointUsage, DiskUsage, RunUsage

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
    "Compression",
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
    "import_orbax",
    "format_run_tree",
    "lazy_array_to_dask",
    "list_runs",
    "open_run",
    "open_telemetry",
    "plot_telemetry",
    "open_run_states",
    "distance_to",
    "successive_change",
    "telemetry_at_checkpoints",
    "plot_states",
    "state_dataset",
    "state_datatree",
    "__version__",
]
