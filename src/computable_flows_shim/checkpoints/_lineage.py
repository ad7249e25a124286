"""Runs and their rollback lineage, from the checkpoints' attributes alone.

A rollback (``rollback_to_checkpoint``) writes the first checkpoint of a new run with
``lineage = {rollback_from, parent_run_id, parent_iteration}`` (spec/FORMAT.md,
"Checkpoint attributes"), so the runs of a store form a forest: each run's parent is
named by the lineage of its earliest checkpoint that has one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from computable_flows_shim import _display as _repr
from computable_flows_shim._format import spec as S
from computable_flows_shim._types import CheckpointId, RunId, Step
from computable_flows_shim.checkpoints._records import CheckpointInfo
from computable_flows_shim.errors import CheckpointNotFoundError


class _Listing(Protocol):
    """What the functions below need of a CheckpointManager."""

    store: Any

    def list_checkpoints(self) -> list[CheckpointInfo]: ...


@dataclass(frozen=True)
class RunInfo:
    """One run of a store: its checkpoints (by iteration) and where it branched from.

    ``parent_run_id``/``branched_from``/``branch_iteration`` come from the lineage of the
    run's earliest checkpoint that has one (None for a run that was not made by a
    rollback); ``children`` are the runs branched from this one.  In a notebook it
    displays as a table (``_repr_html_``).
    """

    run_id: RunId
    checkpoints: tuple[CheckpointInfo, ...]
    parent_run_id: RunId | None = None
    branched_from: CheckpointId | None = None
    branch_iteration: Step | None = None
    children: tuple[RunId, ...] = field(default=())

    @property
    def latest(self) -> CheckpointInfo:
        """The checkpoint with the highest iteration (its telemetry holds the whole history)."""
        return self.checkpoints[-1]

    @property
    def first_iteration(self) -> Step:
        return self.checkpoints[0].iteration

    @property
    def last_iteration(self) -> Step:
        return self.checkpoints[-1].iteration

    @property
    def telemetry_summary(self) -> dict:
        return self.latest.telemetry_summary

    def to_dict(self) -> dict:
        return {
            "run_id": self.run_id,
            "checkpoints": [c.checkpoint_id for c in self.checkpoints],
            "first_iteration": self.first_iteration,
            "last_iteration": self.last_iteration,
            "parent_run_id": self.parent_run_id,
            "branched_from": self.branched_from,
            "branch_iteration": self.branch_iteration,
            "children": list(self.children),
            "telemetry_summary": self.telemetry_summary,
        }

    def __repr__(self) -> str:
        return _repr.run_text(self)

    def _repr_html_(self) -> str:
        return _repr.run_html(self)


def runs_from_infos(infos: list[CheckpointInfo]) -> list[RunInfo]:
    """Group checkpoint listings into runs, sorted by run id, with parents and children."""
    by_run: dict[str, list[CheckpointInfo]] = {}
    for i in infos:
        by_run.setdefault(i.run_id, []).append(i)
    parents: dict[str, tuple[str, str, int | None]] = {}
    for run, cks in by_run.items():
        cks.sort(key=lambda c: (c.iteration, c.created_at))
        for c in cks:
            lin = c.lineage
            if isinstance(lin.get("parent_run_id"), str) and lin["parent_run_id"] != run:
                it = lin.get("parent_iteration")
                parents[run] = (
                    lin["parent_run_id"],
                    str(lin.get("rollback_from")),
                    it if isinstance(it, int) else None,
                )
                break
    children: dict[str, list[str]] = {}
    for run, (parent, _, _) in parents.items():
        children.setdefault(parent, []).append(run)
    out = []
    for run in sorted(by_run):
        p = parents.get(run)
        out.append(
            RunInfo(
                run,
                tuple(by_run[run]),
                p[0] if p else None,
                p[1] if p else None,
                p[2] if p else None,
                tuple(sorted(children.get(run, []))),
            )
        )
    return out


def list_runs(mgr: _Listing) -> list[RunInfo]:
    """Every run in the store, sorted by run id, with its checkpoints and rollback lineage
    (attributes only: no array is read).

    Example::

        >>> [(r.run_id, r.parent_run_id, r.last_iteration) for r in list_runs(mgr)]
        [('exp1', None, 200), ('exp1-branch', 'exp1', 300)]
    """
    return runs_from_infos(mgr.list_checkpoints())


def open_run(mgr: _Listing, run_id: RunId) -> RunInfo:
    """One run (see :func:`list_runs`); CheckpointNotFoundError if it has no checkpoint."""
    S.validate_run_id(run_id)
    for r in list_runs(mgr):
        if r.run_id == run_id:
            return r
    raise CheckpointNotFoundError(f"no checkpoints of run {run_id!r} in {mgr.store}")


def walk_tree(runs: list[RunInfo]) -> Iterator[tuple[RunInfo, str, str]]:
    """``(run, prefix, connector)`` in tree order: roots (runs without a parent in ``runs``)
    sorted by id, each followed by its branches.  A lineage cycle (possible only by hand)
    is broken: every run appears exactly once."""
    by_id = {r.run_id: r for r in runs}
    seen: set[str] = set()

    def visit(r: RunInfo, prefix: str, connector: str, child_prefix: str) -> Iterator[tuple[RunInfo, str, str]]:
        seen.add(r.run_id)
        yield r, prefix, connector
        kids = [by_id[c] for c in r.children if c in by_id and c not in seen]
        for n, k in enumerate(kids):
            last = n == len(kids) - 1
            yield from visit(k, child_prefix, "└── " if last else "├── ", child_prefix + ("    " if last else "│   "))

    roots = [r for r in runs if r.parent_run_id not in by_id]
    for r in roots:
        if r.run_id not in seen:
            yield from visit(r, "", "", "")
    for r in runs:  # members of a cycle
        if r.run_id not in seen:
            yield from visit(r, "", "", "")


def _run_line(r: RunInfo, runs_by_id: dict[str, RunInfo]) -> str:
    s = r.telemetry_summary
    parts = [f"{len(r.checkpoints)} checkpoint{'s' if len(r.checkpoints) != 1 else ''}"]
    parts.append(
        f"iteration {r.first_iteration}"
        if r.first_iteration == r.last_iteration
        else f"iterations {r.first_iteration}..{r.last_iteration}"
    )
    e = s.get("final_energy")
    if isinstance(e, (int, float)) and not isinstance(e, bool):
        parts.append(f"E={e:.6g}")
    if r.branched_from is not None:
        where = f"from {r.branched_from}"
        if r.parent_run_id not in runs_by_id:
            where += " (parent run not in store)"
        parts.insert(0, where)
    return f"{r.run_id}  ({', '.join(parts)})"


def format_run_tree(runs: list[RunInfo]) -> str:
    """The runs as a text tree, each branch under the run it was rolled back from.

    Example::

        >>> print(format_run_tree(list_runs(mgr)))
        exp1  (4 checkpoints, iterations 50..200, E=5.06669)
        └── exp1-branch  (from exp1-i000000000100, 5 checkpoints, iterations 100..300, E=5.06669)
    """
    by_id = {r.run_id: r for r in runs}
    return "\n".join(prefix + conn + _run_line(r, by_id) for r, prefix, conn in walk_tree(runs))


__all__ = ["RunInfo", "list_runs", "open_run", "format_run_tree"]
