"""Export a checkpoint for tools that speak only HDF5 or NumPy (``cfs export ID out.h5``).

Both formats get the same names: ``state/<path>`` for each array leaf (the stored path of
spec/FORMAT.md section 7.1) and ``telemetry/<column>`` for each telemetry column and the
three event columns.  Attributes travel as JSON where they are objects:

- HDF5 (``.h5``, ``.hdf5``, h5py): the root attributes of the checkpoint on the file's
  root (strings and integers as they are, objects such as ``flow_config`` and ``pytree``
  as JSON strings); on each dataset ``key_path``, ``dimension_names`` (JSON) and, where
  they apply, ``cfs_prng_key_impl`` and ``cfs_dtype``.  Text columns are variable-length
  UTF-8 strings.
- NPZ (``.npz``): one ``.npy`` per array, never pickled (``np.load(path,
  allow_pickle=False)`` reads it); the attributes are one JSON document in the 0-d string
  entry ``__cfs_attrs__`` (``{"checkpoint": {...}, "arrays": {name: {...}}}``).  Text
  columns are fixed-width unicode arrays.

Neither HDF5 nor NumPy files know the ML types (bfloat16, float8, int4...): such a leaf is
exported as its raw bits (``uint8``/``uint16``, the format's own byte layout) with
``cfs_dtype`` naming the type, e.g. ``arr.view(ml_dtypes.bfloat16)``.

Leaves are copied chunk by chunk through the verified reader (damage raises, it is never
exported), and the output appears atomically: it is written to a temporary name and
renamed into place.
"""

from __future__ import annotations

import json
import os
import secrets
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim._format import telemetry as T
from computable_flows_shim._format.dtypes import EXTENSION_NAMES, zarr_name
from computable_flows_shim._format.tree import keystr
from computable_flows_shim._types import CheckpointId
from computable_flows_shim.checkpoints._view import CheckpointView
from computable_flows_shim.errors import ExportError, MissingDependencyError

if TYPE_CHECKING:
    from computable_flows_shim.checkpoints._manager import CheckpointManager

FORMATS = {".h5": "hdf5", ".hdf5": "hdf5", ".npz": "npz"}
NPZ_ATTRS = "__cfs_attrs__"
"""The NPZ entry holding the attributes as JSON text."""
_RAW = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _raw_dtype(dtype: np.dtype) -> tuple[np.dtype, str | None]:
    """The dtype to export and, for an ML type that HDF5/NumPy files cannot name, its name."""
    name = zarr_name(dtype)
    if name in EXTENSION_NAMES:
        return np.dtype(_RAW[dtype.itemsize]).newbyteorder("<"), name
    return dtype, None


@dataclass
class _Leaf:
    """An array to export: its name in the output, metadata, and its blocks on demand
    (``slab``: the blocks, in order, are the array in C order)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    attrs: dict[str, Any]
    blocks: Callable[[], Iterator[tuple[tuple[slice, ...], np.ndarray]]]
    slab: bool


def _state_leaves(view: CheckpointView) -> list[_Leaf]:
    out = []
    for kp, node, stored in view.leaves():
        if stored is None:
            continue  # Python scalars and None live in the pytree attribute, exported as JSON
        lay = stored.layout
        assert lay.dtype is not None  # state arrays are numeric
        dtype, ext = _raw_dtype(lay.dtype)
        leaf_attrs: dict[str, Any] = {
            "key_path": keystr(kp),
            "dimension_names": [f"{node['path']}.d{i}" for i in range(len(lay.shape))],
        }
        if stored.key_impl:
            leaf_attrs[S.AA_KEY_IMPL] = stored.key_impl
        if ext:
            leaf_attrs["cfs_dtype"] = ext

        def blocks(stored=stored, dtype=dtype) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
            for coords in stored.layout.coords():
                yield stored.layout.region(coords), view.read_block(stored, coords).view(dtype)

        out.append(_Leaf(f"{S.STATE_GROUP}/{node['path']}", lay.shape, dtype, leaf_attrs, blocks, lay.is_slab))
    return out


def _telemetry_leaves(view: CheckpointView) -> list[_Leaf]:
    cols = view.telemetry_columns()
    events = cols.pop("events")
    out = []
    for dim, group in ((S.T_SAMPLE_DIM, cols), (S.T_EVENT_DIM, T.event_columns(events))):
        for name, col in sorted(group.items()):
            col = np.asarray(col)

            def blocks(col=col) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
                yield (slice(0, len(col)),), col

            out.append(
                _Leaf(f"{S.TELEMETRY_GROUP}/{name}", col.shape, col.dtype, {"dimension_names": [dim]}, blocks, True)
            )
    return out


def _root_attrs(attrs: dict) -> dict[str, Any]:
    """Strings and integers as they are, everything else (objects, floats) as JSON text."""
    return {
        k: v if isinstance(v, (str, int)) and not isinstance(v, bool) else json.dumps(v, allow_nan=False)
        for k, v in attrs.items()
    }


def _write_hdf5(tmp: str, attrs: dict, leaves: list[_Leaf]) -> None:
    try:
        import h5py
    except ImportError as e:
        raise MissingDependencyError("HDF5 export needs h5py: pip install 'computable-flows-shim[analysis]'") from e
    with h5py.File(tmp, "w") as f:
        f.attrs.update(_root_attrs(attrs))
        for leaf in leaves:
            text = leaf.dtype == object
            dtype = h5py.string_dtype("utf-8") if text else leaf.dtype
            ds = f.create_dataset(leaf.name, shape=leaf.shape, dtype=dtype)
            for k, v in leaf.attrs.items():
                ds.attrs[k] = json.dumps(v) if isinstance(v, list) else v
            for region, block in leaf.blocks():
                if block.size:
                    ds[region] = block


def _npy_header_dtype(leaf: _Leaf) -> np.dtype:
    if leaf.dtype == object:  # text: fixed-width unicode, never pickled objects
        return np.dtype(f"<U{max(1, max((len(s) for s in next(leaf.blocks())[1].reshape(-1)), default=1))}")
    return leaf.dtype


def _write_npz(tmp: str, attrs: dict, leaves: list[_Leaf]) -> None:
    meta = {"checkpoint": attrs, "arrays": {leaf.name: leaf.attrs for leaf in leaves}}
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for leaf in leaves:
            dtype = _npy_header_dtype(leaf)
            with zf.open(leaf.name + ".npy", "w", force_zip64=True) as f:
                if not leaf.slab:  # chunks are not consecutive bytes: assemble the leaf
                    full = np.empty(leaf.shape, dtype)
                    for region, block in leaf.blocks():
                        full[region] = block
                    np.lib.format.write_array(f, full, allow_pickle=False)
                    continue
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": leaf.shape}
                np.lib.format.write_array_header_2_0(f, header)
                for _region, block in leaf.blocks():  # slab chunks in grid order = the array in C order
                    f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
        doc = np.array(json.dumps(meta, allow_nan=False, ensure_ascii=False))
        with zf.open(NPZ_ATTRS + ".npy", "w") as f:
            np.lib.format.write_array(f, doc, allow_pickle=False)


def export_checkpoint(
    mgr: CheckpointManager, checkpoint_id: CheckpointId, path: str | os.PathLike, *, overwrite: bool = False
) -> str:
    """Write checkpoint ``checkpoint_id`` to ``path`` as HDF5 (``.h5``/``.hdf5``) or NPZ
    (``.npz``), chosen by the suffix; returns the path.

    Raises ExportError for another suffix or an existing file (unless ``overwrite``);
    MissingDependencyError if h5py is needed and missing.  See the module docstring for
    the layout.

    Example::

        >>> export_checkpoint(mgr, "exp1-i000000000200", "exp1.h5")
        >>> import h5py; h5py.File("exp1.h5")["state/x"][:10]
        >>> import numpy as np; np.load("exp1.npz", allow_pickle=False)["state/x"]
    """
    out = os.fspath(path)
    fmt = FORMATS.get(os.path.splitext(out)[1].lower())
    if fmt is None:
        raise ExportError(f"cannot export to {out!r}: use a .h5, .hdf5 or .npz file name")
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out!r} already exists (overwrite=True, cfs export --force, replaces it)")
    view = mgr.open_checkpoint(checkpoint_id)
    leaves = _state_leaves(view) + _telemetry_leaves(view)
    # a temporary beside the output, then a rename: a failed export leaves no half file
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.{secrets.token_hex(6)}.tmp")
    try:
        (_write_hdf5 if fmt == "hdf5" else _write_npz)(tmp, view.attrs, leaves)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


__all__ = ["export_checkpoint"]
