"""Domain type names, defined once and used everywhere."""

from __future__ import annotations

from typing import Any, TypeAlias

PyTree: TypeAlias = Any
"""Any JAX pytree: nested dicts, lists, tuples, namedtuples, registered nodes."""
CheckpointId: TypeAlias = str
"""``<run_id>-i<iteration:012d>``, a portable file name (see spec/FORMAT.md)."""
RunId: TypeAlias = str
"""A portable file name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``."""
Step: TypeAlias = int
"""A flow iteration number (non-negative)."""
