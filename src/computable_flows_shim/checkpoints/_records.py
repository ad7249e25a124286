"""What the manager reports about checkpoints: plain records built from attributes,
shared by the manager, retention and lineage (none of which imports another for them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from computable_flows_shim._format import spec as S
from computable_flows_shim._types import CheckpointId, RunId, Step


@dataclass(frozen=True)
class CheckpointInfo:
    """What listing knows about a checkpoint, from its attributes alone (no arrays read)."""

    checkpoint_id: CheckpointId
    run_id: RunId
    iteration: Step
    created_at: str
    path: str
    flow_config: dict = field(repr=False)
    certificates: dict = field(repr=False)
    metadata: dict = field(repr=False)
    lineage: dict = field(repr=False)
    telemetry_summary: dict = field(repr=False)

    @classmethod
    def from_attrs(cls, attrs: dict, path: str) -> CheckpointInfo:
        return cls(
            attrs[S.A_CHECKPOINT_ID],
            attrs[S.A_RUN_ID],
            attrs[S.A_ITERATION],
            str(attrs.get(S.A_CREATED_AT)),
            path,
            attrs.get(S.A_FLOW_CONFIG) or {},
            attrs.get(S.A_CERTIFICATES) or {},
            attrs.get(S.A_METADATA) or {},
            attrs.get(S.A_LINEAGE) or {},
            attrs.get(S.A_TELEMETRY_SUMMARY) or {},
        )


@dataclass(frozen=True)
class VerifyReport:
    """Result of :meth:`CheckpointManager.verify_checkpoint`."""

    checkpoint_id: CheckpointId
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok


__all__ = ["CheckpointInfo", "VerifyReport"]
