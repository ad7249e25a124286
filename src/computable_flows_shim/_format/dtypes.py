"""Data type names: numpy dtype <-> Zarr v3 ``data_type`` name.

Core Zarr v3 types use the core names; the ML types that zarr-python does not
know use the names of the Zarr community extension registry
(zarr-developers/zarr-extensions, ``data-types/<name>``), which tensorstore also
reads.  Sub-byte types (int4, float4...) are stored one element per byte, as
the registry's ``bytes`` codec section specifies.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from computable_flows_shim.errors import CheckpointFormatError

_CORE = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
]
_EXTENSION = [
    "bfloat16",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e4m3b11fnuz",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "float4_e2m1fn",
    "int2",
    "int4",
    "uint2",
    "uint4",
]

NAME_TO_DTYPE: dict[str, np.dtype] = {n: np.dtype(n) for n in _CORE}
for _n in _EXTENSION:
    if hasattr(ml_dtypes, _n):
        NAME_TO_DTYPE[_n] = np.dtype(getattr(ml_dtypes, _n))
DTYPE_TO_NAME: dict[np.dtype, str] = {d: n for n, d in NAME_TO_DTYPE.items()}
EXTENSION_NAMES = frozenset(n for n in _EXTENSION if n in NAME_TO_DTYPE)


def zarr_name(dtype: np.dtype) -> str | None:
    """The Zarr v3 name of ``dtype`` (byte order ignored), or None if unsupported."""
    return DTYPE_TO_NAME.get(np.dtype(dtype).newbyteorder("="))


def from_zarr_name(name: object, where: str) -> np.dtype:
    """The little-endian numpy dtype for a stored name; refuses anything else."""
    if not isinstance(name, str) or name not in NAME_TO_DTYPE:
        raise CheckpointFormatError(f"{where}: unsupported data_type {name!r}")
    return NAME_TO_DTYPE[name].newbyteorder("<")


def fill_value_json(name: str) -> object:
    """The fill value we write: zero in the JSON form the Zarr v3 spec gives."""
    dtype = NAME_TO_DTYPE[name]
    if name.startswith(("int", "uint")):
        return 0
    if dtype.kind == "b":
        return False
    if dtype.kind == "c":
        return [0.0, 0.0]
    if dtype.kind in "iu":
        return 0
    return 0.0
