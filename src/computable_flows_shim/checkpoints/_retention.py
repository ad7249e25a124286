"""Retention: which checkpoints of a run to keep, declared as small composable policies.

A policy looks at the checkpoints of one run (:class:`CheckpointInfo`, attributes only,
no arrays read) and returns the ids it keeps, each with a reason, so that a dry run can
say *why* every survivor survives.  Policies combine with :func:`any_of` (or ``|``): a
checkpoint is kept when any policy keeps it.

Three rules hold whatever the policy (users of other libraries lost the
checkpoint they needed to a "keep best" rule or to a cleanup):

- the newest checkpoint (highest iteration) of a run is never deleted;
- a tagged checkpoint is never deleted (untag it, or delete it explicitly);
- a checkpoint another existing run was branched from (``lineage.rollback_from``) is never
  deleted, nor the branch's own first checkpoint that records it (else deleting the branch
  point would silently drop the parent's protection), unless ``force=True``.

:func:`plan` computes the decisions; :meth:`CheckpointManager.apply_retention` deletes
exactly what the plan says (or, with ``dry_run=True``, only reports it).
"""

from __future__ import annotations

import abc
import datetime as _dt
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from computable_flows_shim._format.spec import validate_tag
from computable_flows_shim._types import CheckpointId, RunId
from computable_flows_shim.checkpoints._records import CheckpointInfo

Tags = Mapping[CheckpointId, frozenset[str]]
Reasons = dict[CheckpointId, tuple[str, ...]]


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


class RetentionPolicy(abc.ABC):
    """Decides which checkpoints of one run to keep, and says why.

    Subclasses implement :meth:`keeps`; ``str(policy)`` names the policy in reports.
    Example::

        >>> from computable_flows_shim import KeepLatest, KeepBest
        >>> policy = KeepLatest(3) | KeepBest("final_energy", 2)
        >>> str(policy)
        'any_of(keep_latest(3), keep_best(final_energy, min, 2))'
    """

    @abc.abstractmethod
    def keeps(self, checkpoints: Sequence[CheckpointInfo], tags: Tags) -> Reasons:
        """The ids among ``checkpoints`` (all of one run) this policy keeps, each with its reasons.
        ``tags`` maps checkpoint ids to their tags."""

    def __or__(self, other: RetentionPolicy) -> RetentionPolicy:
        return any_of(self, other)


@dataclass(frozen=True)
class KeepLatest(RetentionPolicy):
    """Keep the ``n`` checkpoints with the highest iterations.

    Example::

        >>> mgr.apply_retention("run-a", KeepLatest(5))
    """

    n: int

    def __post_init__(self) -> None:
        _positive("KeepLatest: n", self.n)

    def __str__(self) -> str:
        return f"keep_latest({self.n})"

    def keeps(self, checkpoints: Sequence[CheckpointInfo], tags: Tags) -> Reasons:
        ranked = sorted(checkpoints, key=lambda i: (i.iteration, i.created_at), reverse=True)
        return {i.checkpoint_id: (str(self),) for i in ranked[: self.n]}


@dataclass(frozen=True)
class KeepEvery(RetentionPolicy):
    """Keep checkpoints whose iteration is a multiple of ``n`` (a sparse history that
    does not move as the run goes on).

    Example::

        >>> mgr.apply_retention("run-a", KeepLatest(3) | KeepEvery(1000))
    """

    n: int

    def __post_init__(self) -> None:
        _positive("KeepEvery: n", self.n)

    def __str__(self) -> str:
        return f"keep_every({self.n})"

    def keeps(self, checkpoints: Sequence[CheckpointInfo], tags: Tags) -> Reasons:
        return {i.checkpoint_id: (str(self),) for i in checkpoints if i.iteration % self.n == 0}


def _timestamp(created_at: str) -> float | None:
    try:
        t = _dt.datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return t.timestamp()


@dataclass(frozen=True)
class KeepPerInterval(RetentionPolicy):
    """Keep the first checkpoint (by ``created_at``) in each ``seconds``-long interval of
    wall-clock time, intervals aligned to the Unix epoch.

    Fixed intervals, not "``seconds`` after the last kept one": deleting other checkpoints
    never changes which one is first in its interval, so applying the policy again keeps
    the same set.  A checkpoint whose ``created_at`` does not parse is not kept by this policy.

    Example::

        >>> mgr.apply_retention("run-a", KeepPerInterval(3600))  # one per hour
    """

    seconds: float

    def __post_init__(self) -> None:
        s = self.seconds
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"KeepPerInterval: seconds must be a finite number > 0, got {s!r}")

    def __str__(self) -> str:
        return f"keep_per_interval({self.seconds:g}s)"

    def keeps(self, checkpoints: Sequence[CheckpointInfo], tags: Tags) -> Reasons:
        first: dict[int, tuple[float, int, CheckpointId]] = {}
        for i in checkpoints:
            t = _timestamp(i.created_at)
            if t is None:
                continue
            bucket = math.floor(t / self.seconds)
            cand = (t, i.iteration, i.checkpoint_id)
            if bucket not in first or cand < first[bucket]:
                first[bucket] = cand
        return {cid: (str(self),) for _, _, cid in first.values()}


METRIC_ALIASES = {"E": "final_energy", "grad_norm": "final_grad_norm"}
"""Telemetry column names accepted as metrics: the column's last value, as the summary keeps it."""


def metric_value(info: CheckpointInfo, metric: str) -> float | None:
    """``metric`` from ``telemetry_summary`` (e.g. ``final_energy``; ``E`` means it too), else
    from ``certificates`` (e.g. ``gamma``); None when absent, not a number or not finite
    (non-finite values are stored as the strings ``"NaN"``/``"Infinity"``)."""
    for source in (info.telemetry_summary, info.certificates):
        if metric not in source and metric in METRIC_ALIASES and METRIC_ALIASES[metric] in source:
            metric = METRIC_ALIASES[metric]
        if metric in source:
            v = source[metric]
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                return None
            return float(v)
    return None


@dataclass(frozen=True)
class KeepBest(RetentionPolicy):
    """Keep the ``k`` checkpoints with the best value of ``metric`` (``mode="min"``: lowest).

    The metric is looked up in the checkpoint's ``telemetry_summary`` (``final_energy``,
    ``final_grad_norm``, ``energy_min`` ...) and then in its ``certificates`` (``gamma``,
    ``eta_dd`` ...).  Checkpoints without a finite value are never "best".  Ties go to the
    higher iteration.  The newest checkpoint is kept anyway, even when the metric got worse.

    Example::

        >>> mgr.apply_retention("run-a", KeepBest("final_energy", k=3, mode="min"))
    """

    metric: str
    k: int = 1
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"KeepBest: metric must be a non-empty str, got {self.metric!r}")
        _positive("KeepBest: k", self.k)
        if self.mode not in ("min", "max"):
            raise ValueError(f"KeepBest: mode must be 'min' or 'max', got {self.mode!r}")

    def __str__(self) -> str:
        return f"keep_best({self.metric}, {self.mode}, {self.k})"

    def keeps(self, checkpoints: Sequence[CheckpointInfo], tags: Tags) -> Reasons:
        sign = 1.0 if self.mode == "min" else -1.0
        scored = [
            (sign * v, -i.iteration, i.checkpoint_id, v)
            for i in checkpoints
            if (v := metric_value(i, self.metric)) is not None
        ]
        scored.sort()
        return {
            cid: (f"{self}: #{rank} {self.metric}={v:.6g}",)
            for rank, (_, _, cid, v) in enumerate(scored[: self.k], start=1)
        }


@dataclass(frozen=True, init=False)
class KeepTagged(RetentionPolicy):
    """Keep checkpoints carrying any of ``tags`` (any tag at all when none are given).

    Tagged checkpoints are protected whatever the policy; this policy makes that explicit
    in a combination (and in its report).

    Example::

        >>> mgr.tag_checkpoint("run-a-i000000000100", "paper-figure-3")
        >>> mgr.apply_retention("run-a", KeepLatest(1) | KeepTagged("paper-figure-3"))
    """

    tags: tuple[str, ...]

    def __init__(self, *tags: str) -> None:
        object.__setattr__(self, "tags", tuple(validate_tag(t) for t in tags))

    def __str__(self) -> str:
        return f"keep_tagged({', '.join(self.tags)})"

    def keeps(self, checkpoints: Sequence[CheckpointInfo], tags: Tags) -> Reasons:
        out: Reasons = {}
        for i in checkpoints:
            have = tags.get(i.checkpoint_id, frozenset())
            hit = sorted(have & set(self.tags)) if self.tags else sorted(have)
            if hit:
                out[i.checkpoint_id] = tuple(f"tagged: {t}" for t in hit)
        return out


@dataclass(frozen=True)
class AnyOf(RetentionPolicy):
    """Keep what any of ``policies`` keeps; the reasons of all of them are reported."""

    policies: tuple[RetentionPolicy, ...]

    def __str__(self) -> str:
        return f"any_of({', '.join(map(str, self.policies))})"

    def keeps(self, checkpoints: Sequence[CheckpointInfo], tags: Tags) -> Reasons:
        out: dict[CheckpointId, list[str]] = {}
        for p in self.policies:
            for cid, why in p.keeps(checkpoints, tags).items():
                out.setdefault(cid, []).extend(why)
        return {cid: tuple(dict.fromkeys(why)) for cid, why in out.items()}


def any_of(*policies: RetentionPolicy) -> RetentionPolicy:
    """A policy keeping what any of ``policies`` keeps (nested any_of are flattened).

    Example::

        >>> from computable_flows_shim import any_of, KeepLatest, KeepEvery, KeepBest
        >>> str(any_of(KeepLatest(2), KeepEvery(1000), KeepBest("gamma", 1, "max")))
        'any_of(keep_latest(2), keep_every(1000), keep_best(gamma, max, 1))'
    """
    if not policies:
        raise ValueError("any_of needs at least one policy")
    flat: list[RetentionPolicy] = []
    for p in policies:
        if not isinstance(p, RetentionPolicy):
            raise TypeError(f"any_of: expected RetentionPolicy objects, got {type(p).__name__}")
        flat.extend(p.policies if isinstance(p, AnyOf) else (p,))
    return flat[0] if len(flat) == 1 else AnyOf(tuple(flat))


# ---------------------------------------------------------------- decisions and reports

NEWEST = "newest"


@dataclass(frozen=True)
class RetentionDecision:
    """What retention does with one checkpoint, and why it keeps it (empty: deleted)."""

    checkpoint_id: CheckpointId
    iteration: int
    keep: bool
    reasons: tuple[str, ...]

    @property
    def action(self) -> str:
        return "keep" if self.keep else "delete"

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint_id": self.checkpoint_id,
            "iteration": self.iteration,
            "action": self.action,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class RetentionReport:
    """The result of :meth:`CheckpointManager.apply_retention`: one decision per checkpoint
    of the run, newest first.  A dry run and the real cleanup after it return equal
    ``decisions`` when the store did not change in between."""

    run_id: RunId
    policy: str
    dry_run: bool
    force: bool
    decisions: tuple[RetentionDecision, ...]

    @property
    def kept(self) -> list[CheckpointId]:
        return [d.checkpoint_id for d in self.decisions if d.keep]

    @property
    def deleted(self) -> list[CheckpointId]:
        """Ids deleted (or, in a dry run, that would be)."""
        return [d.checkpoint_id for d in self.decisions if not d.keep]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "policy": self.policy,
            "dry_run": self.dry_run,
            "force": self.force,
            "kept": len(self.kept),
            "deleted": len(self.deleted),
            "decisions": [d.to_dict() for d in self.decisions],
        }


def plan(
    run_id: RunId,
    everything: Sequence[CheckpointInfo],
    tags: Tags,
    policy: RetentionPolicy,
    force: bool = False,
) -> tuple[RetentionDecision, ...]:
    """Decide, for every checkpoint of ``run_id`` among ``everything`` (the whole store,
    for lineage), whether to keep it and why; newest first."""
    run = [i for i in everything if i.run_id == run_id]
    ids = {i.checkpoint_id for i in run}
    existing = {i.checkpoint_id for i in everything}
    why: dict[CheckpointId, list[str]] = {cid: [] for cid in ids}
    if run:
        newest = max(run, key=lambda i: (i.iteration, i.created_at))
        why[newest.checkpoint_id].append(NEWEST)
    for cid in ids:
        why[cid].extend(f"tagged: {t}" for t in sorted(tags.get(cid, ())))
    if not force:
        for b in everything:
            parent = b.lineage.get("rollback_from") if isinstance(b.lineage, Mapping) else None
            if not isinstance(parent, str) or b.run_id == run_id and parent in ids:
                continue  # a rollback into the same run protects nothing
            if parent in ids:
                why[parent].append(f"lineage: branch run {b.run_id}")
            if b.checkpoint_id in ids and parent in existing:
                why[b.checkpoint_id].append(f"lineage: branch point from {parent}")
    for cid, reasons in policy.keeps(run, tags).items():
        if cid in why:
            why[cid].extend(reasons)
    ordered = sorted(run, key=lambda i: (i.iteration, i.created_at, i.checkpoint_id), reverse=True)
    return tuple(
        RetentionDecision(
            i.checkpoint_id, i.iteration, bool(why[i.checkpoint_id]), tuple(dict.fromkeys(why[i.checkpoint_id]))
        )
        for i in ordered
    )


__all__ = [
    "AnyOf",
    "KeepBest",
    "KeepEvery",
    "KeepLatest",
    "KeepPerInterval",
    "KeepTagged",
    "RetentionDecision",
    "RetentionPolicy",
    "RetentionReport",
    "any_of",
    "metric_value",
    "plan",
]
