"""Compare two checkpoints leaf by leaf: identical or changed, how many elements, the
largest absolute difference, shape and dtype changes, and the attributes that differ.

Arrays are compared chunk by chunk through the verified reader (damage raises, it is
never compared as data), so memory stays at two chunks whatever the state's size.  A
chunk that is the same file in both checkpoints (hard-linked by a rollback or an
incremental save: files are immutable once committed, spec/FORMAT.md section 3) is
identical without being read.  "Identical" means bit for bit: ``-0.0`` and ``0.0``
differ, a NaN equals the same NaN.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from computable_flows_shim._display import diff_html, diff_text
from computable_flows_shim._format import spec as S
from computable_flows_shim._format.tree import KeyPath, keystr, scalar_value
from computable_flows_shim._types import CheckpointId
from computable_flows_shim.checkpoints._view import CheckpointView, LazyArray, Stored

if TYPE_CHECKING:
    from computable_flows_shim.checkpoints._manager import CheckpointManager

IDENTICAL = "identical"
CHANGED = "changed"
SHAPE_CHANGED = "shape changed"
DTYPE_CHANGED = "dtype changed"
KIND_CHANGED = "kind changed"
ONLY_IN_A = "only in a"
ONLY_IN_B = "only in b"

COMPARED_ATTRS = (
    S.A_ITERATION,
    S.A_RUN_ID,
    S.A_FLOW_CONFIG,
    S.A_CERTIFICATES,
    S.A_METADATA,
    S.A_LINEAGE,
    S.A_TELEMETRY_SUMMARY,
)


@dataclass(frozen=True)
class LeafDiff:
    """One leaf of a :class:`CheckpointDiff`.

    ``status``: ``identical``, ``changed``, ``shape changed``, ``dtype changed``, ``kind
    changed`` (array in one, Python scalar in the other), ``only in a``, ``only in b``.
    For compared arrays, ``changed_elements`` counts elements whose bits differ and
    ``max_abs_diff`` is the largest ``|a - b|`` over them, computed in float64 (complex:
    the modulus; NaN where one side is NaN and the other is not); ``chunks_read`` says
    how many chunk pairs were read (hard-linked chunks are skipped).
    """

    key_path: KeyPath
    status: str
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    changed_elements: int = 0
    max_abs_diff: float | None = None
    chunks_read: int = 0
    value_a: Any = field(default=None, compare=False)
    value_b: Any = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return keystr(self.key_path)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"leaf": self.name, "status": self.status}
        for k in ("shape_a", "shape_b", "dtype_a", "dtype_b"):
            v = getattr(self, k)
            if v is not None:
                d[k] = list(v) if isinstance(v, tuple) else v
        if self.status in (CHANGED, IDENTICAL) and self.shape_a is not None:
            d["changed_elements"] = self.changed_elements
            d["max_abs_diff"] = _json_float(self.max_abs_diff)
        if self.value_a is not None or self.value_b is not None:
            d["value_a"], d["value_b"] = _jsonable(self.value_a), _jsonable(self.value_b)
        return d


def _json_float(x: float | None) -> Any:
    """Non-finite floats as the format's strings (strict JSON has no NaN)."""
    if x is None or math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _jsonable(v: Any) -> Any:
    if isinstance(v, complex):
        return [_json_float(v.real), _json_float(v.imag)]
    if isinstance(v, float):
        return _json_float(v)
    return v


@dataclass(frozen=True)
class CheckpointDiff:
    """The result of :func:`diff_checkpoints`: ``leaves`` (one :class:`LeafDiff` per key
    path of either side, in ``a``'s tree order then ``b``'s extras) and ``attrs``
    (attribute name -> ``(value in a, value in b)`` for the attributes that differ)."""

    a: CheckpointId
    b: CheckpointId
    leaves: list[LeafDiff]
    attrs: dict[str, tuple[Any, Any]]

    @property
    def identical(self) -> bool:
        """True when every leaf is bit-identical (attributes such as the iteration may differ)."""
        return all(leaf.status == IDENTICAL for leaf in self.leaves)

    @property
    def changed(self) -> list[LeafDiff]:
        return [leaf for leaf in self.leaves if leaf.status != IDENTICAL]

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "identical": self.identical,
            "leaves": [leaf.to_dict() for leaf in self.leaves],
            "attrs": {k: {"a": va, "b": vb} for k, (va, vb) in self.attrs.items()},
        }

    def format(self) -> str:
        """A text table, one line per leaf, then the attributes that differ."""
        return diff_text(self)

    __str__ = format

    def _repr_html_(self) -> str:
        return diff_html(self)


def _nodes(view: CheckpointView) -> dict[KeyPath, tuple[dict, Stored | None]]:
    return {kp: (node, stored) for kp, node, stored in view.leaves()}


def _dtype_name(s: Stored) -> str:
    return s.layout.dtype.name if s.layout.dtype is not None else "string"


def _same_chunk(va: CheckpointView, sa: Stored, vb: CheckpointView, sb: Stored, coords: tuple[int, ...]) -> bool:
    """Whether the chunk at ``coords`` is one immutable local file in both checkpoints (hard-linked
    by an incremental save or a rollback), or, for packed leaves, the same place in the same pack
    chunk files: nothing to read.  A mirror's files are never shared between checkpoints."""
    if va.mirror is not None or vb.mirror is not None:
        return False
    ia = va.chunk_identity(sa, coords)
    return ia is not None and ia == vb.chunk_identity(sb, coords)


def _compare_blocks(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(elements whose bits differ, max |a - b| over them)."""
    if a.dtype == object:  # text
        return int(np.count_nonzero(a != b)), 0.0
    k = a.dtype.itemsize
    if a.size == 0:
        return 0, 0.0
    ab = np.ascontiguousarray(a).reshape(-1).view(np.uint8).reshape(-1, k)
    bb = np.ascontiguousarray(b).reshape(-1).view(np.uint8).reshape(-1, k)
    neq = (ab != bb).any(axis=1)
    n = int(np.count_nonzero(neq))
    if not n:
        return 0, 0.0
    fa, fb = a.reshape(-1)[neq], b.reshape(-1)[neq]
    kind = "complex" if np.issubdtype(a.dtype, np.complexfloating) else "float"
    wide = np.complex128 if kind == "complex" else np.float64
    with np.errstate(all="ignore"):
        xa, xb = fa.astype(wide), fb.astype(wide)
        d = np.abs(xa - xb)
        both_nan = np.isnan(xa) & np.isnan(xb)  # NaNs with different payloads: not a numeric difference
        d[both_nan] = 0.0
    return n, float(d.max())


def _compare_arrays(sa: Stored, sb: Stored, va: CheckpointView, vb: CheckpointView):
    la, lb = sa.layout, sb.layout
    same_layout = la.chunk_shape == lb.chunk_shape and la.separator == lb.separator
    lazy_b = LazyArray(sb, sb.where, (vb.path, vb.checkpoint_id))
    changed, worst, read = 0, 0.0, 0
    for coords in la.coords():
        if same_layout and _same_chunk(va, sa, vb, sb, coords):
            continue
        block_a = va.read_block(sa, coords)
        if same_layout:
            block_b = vb.read_block(sb, coords)
        else:
            block_b = lazy_b[la.region(coords)]
        read += 1
        n, d = _compare_blocks(block_a, block_b)
        changed += n
        worst = math.nan if math.isnan(d) or math.isnan(worst) else max(worst, d)
    return changed, worst, read


def _compare_scalars(kp: KeyPath, x: Any, y: Any) -> LeafDiff:
    same = type(x) is type(y) and (x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)))
    if isinstance(x, float) and isinstance(y, float) and same:
        same = math.copysign(1.0, x) == math.copysign(1.0, y)
    d = None
    numeric = (bool, int, float, complex)
    if not same and isinstance(x, numeric) and isinstance(y, numeric):
        d = abs(complex(x) - complex(y))
    return LeafDiff(kp, IDENTICAL if same else CHANGED, max_abs_diff=d, value_a=x, value_b=y)


def diff_checkpoints(mgr: CheckpointManager, a: CheckpointId, b: CheckpointId) -> CheckpointDiff:
    """Compare the states (and main attributes) of checkpoints ``a`` and ``b`` leaf by leaf.

    Leaves are matched by key path.  Arrays of the same shape and dtype are compared
    chunk by chunk, reading two chunks at a time (each checked: damage raises
    CheckpointCorruptError); chunks hard-linked between the two are not read.

    Example::

        >>> d = diff_checkpoints(mgr, "exp1-i000000000100", "exp1-i000000000200")
        >>> [(leaf.name, leaf.status, leaf.max_abs_diff) for leaf in d.leaves]
        [("state['x']", 'changed', 0.0123), ("state['y']", 'identical', 0.0), ...]
        >>> print(d)                                       # a table; cfs diff A B prints the same
    """
    va, vb = mgr.open_checkpoint(a), mgr.open_checkpoint(b)
    na, nb = _nodes(va), _nodes(vb)
    leaves: list[LeafDiff] = []
    for kp, (node_a, sa) in na.items():
        if kp not in nb:
            leaves.append(
                LeafDiff(
                    kp,
                    ONLY_IN_A,
                    shape_a=sa.layout.shape if sa else None,
                    dtype_a=_dtype_name(sa) if sa else None,
                )
            )
            continue
        node_b, sb = nb[kp]
        if sa is None or sb is None:
            if sa is None and sb is None:
                wa, wb = f"checkpoint {a!r}", f"checkpoint {b!r}"
                leaves.append(_compare_scalars(kp, scalar_value(node_a, wa), scalar_value(node_b, wb)))
            else:
                leaves.append(
                    LeafDiff(
                        kp,
                        KIND_CHANGED,
                        shape_a=sa.layout.shape if sa else None,
                        shape_b=sb.layout.shape if sb else None,
                        dtype_a=_dtype_name(sa) if sa else None,
                        dtype_b=_dtype_name(sb) if sb else None,
                    )
                )
            continue
        shapes = (sa.layout.shape, sb.layout.shape)
        dtypes = (_dtype_name(sa), _dtype_name(sb))
        key_a, key_b = sa.key_impl, sb.key_impl
        if dtypes[0] != dtypes[1] or key_a != key_b:
            leaves.append(LeafDiff(kp, DTYPE_CHANGED, *shapes, *dtypes))
        elif shapes[0] != shapes[1]:
            leaves.append(LeafDiff(kp, SHAPE_CHANGED, *shapes, *dtypes))
        else:
            n, d, read = _compare_arrays(sa, sb, va, vb)
            leaves.append(LeafDiff(kp, CHANGED if n else IDENTICAL, *shapes, *dtypes, n, d, read))
    for kp, (_node_b, sb) in nb.items():
        if kp not in na:
            leaves.append(
                LeafDiff(
                    kp, ONLY_IN_B, shape_b=sb.layout.shape if sb else None, dtype_b=_dtype_name(sb) if sb else None
                )
            )
    attrs = {}
    for k in COMPARED_ATTRS:
        x, y = va.attrs.get(k), vb.attrs.get(k)
        if json.dumps(x, sort_keys=True) != json.dumps(y, sort_keys=True):
            attrs[k] = (x, y)
    return CheckpointDiff(a, b, leaves, attrs)


__all__ = ["CheckpointDiff", "LeafDiff", "diff_checkpoints"]
