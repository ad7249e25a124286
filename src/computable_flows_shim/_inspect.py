"""What a checkpoint holds, from metadata alone: one :class:`LeafInfo` per leaf (shape,
dtype, chunk layout, bytes in memory and on disk), without reading any chunk.

Used by ``cfs show``, the notebook displays (``_repr_html_``) and :func:`diff_checkpoints`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from . import _codec
from . import _spec as S
from ._tree import KeyPath, iter_leaf_nodes, keystr, scalar_value
from ._view import CheckpointView, deleted_while_reading


@dataclass(frozen=True)
class LeafInfo:
    """One leaf of a checkpoint's state.

    ``kind`` is ``"array"`` (stored at ``state/<path>``) or ``"scalar"`` (a Python scalar
    kept in the ``pytree`` attribute: ``value``).  For arrays: ``chunk_shape``, ``grid``
    (chunks per dimension), ``nbytes`` (in memory) and ``disk_bytes`` (its chunk files
    and ``zarr.json``, hard links counted as files).  PRNG-key leaves are described by
    their raw key data, ``key_impl`` names the implementation.
    """

    key_path: KeyPath
    kind: str
    path: str | None = None
    shape: tuple[int, ...] = ()
    dtype: str = ""
    chunk_shape: tuple[int, ...] = ()
    grid: tuple[int, ...] = ()
    nbytes: int = 0
    disk_bytes: int = 0
    key_impl: str | None = None
    value: Any = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """How errors name the leaf: ``state['opt'][0]``."""
        return keystr(self.key_path)

    @property
    def nchunks(self) -> int:
        return math.prod(self.grid) if self.kind == "array" else 0

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "scalar":
            return {"leaf": self.name, "kind": "scalar", "value": self.value}
        return {
            "leaf": self.name,
            "kind": "array",
            "path": f"{S.STATE_GROUP}/{self.path}",
            "shape": list(self.shape),
            "dtype": self.dtype,
            "chunks": list(self.chunk_shape),
            "grid": list(self.grid),
            "nchunks": self.nchunks,
            "bytes": self.nbytes,
            "disk_bytes": self.disk_bytes,
            **({"key_impl": self.key_impl} if self.key_impl else {}),
        }


def _tree_bytes(path: str) -> int:
    """Sizes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for base, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(base, f))
            except FileNotFoundError:
                continue
            total += st.st_size
    return total


def checkpoint_disk_bytes(path: str) -> int:
    """Bytes of a checkpoint directory's files, each hard-linked file counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for base, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(base, f))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def describe_leaves(view: CheckpointView, *, disk: bool = True) -> list[LeafInfo]:
    """Every leaf of ``view``'s state in tree order, from metadata only (no chunk is read).

    ``disk=False`` skips the ``stat`` of every chunk file (``disk_bytes`` is then 0).

    Example::

        >>> [(leaf.name, leaf.shape, leaf.chunk_shape) for leaf in describe_leaves(view)]
        [("state['x']", (4096,), (4096,)), ...]
    """
    state_dir = os.path.join(view.path, S.STATE_GROUP)
    out: list[LeafInfo] = []
    with deleted_while_reading(view.path, view.checkpoint_id):
        for kp, node in iter_leaf_nodes(view.attrs[S.A_TREE], where=f"checkpoint {view.checkpoint_id!r}"):
            where = f"checkpoint {view.checkpoint_id!r}, leaf {keystr(kp)}"
            if node["kind"] == "scalar":
                out.append(LeafInfo(kp, "scalar", value=scalar_value(node, where)))
                continue
            stored = _codec.open_array(state_dir, node["path"], where)
            lay = stored.layout
            dtype = lay.dtype.name if lay.dtype is not None else "string"
            out.append(
                LeafInfo(
                    kp,
                    "array",
                    node["path"],
                    lay.shape,
                    dtype,
                    lay.chunk_shape,
                    lay.grid,
                    math.prod(lay.shape) * (lay.dtype.itemsize if lay.dtype is not None else 0),
                    _tree_bytes(stored.dirpath) if disk else 0,
                    stored.key_impl,
                )
            )
    return out


__all__ = ["LeafInfo", "describe_leaves", "checkpoint_disk_bytes"]
