"""The ML data types of computable-flows-shim checkpoints (bfloat16, float8, float6, float4,
int4, int2 and their unsigned kin), for zarr-python.

zarr-python 3 knows the core Zarr v3 data types only; the checkpoints store the ML types under
the names of the Zarr extension registry (zarr-developers/zarr-extensions, ``data-types/``),
which tensorstore reads too.  This module defines one ``ZDType`` per name, each wrapping the
``ml_dtypes`` numpy type, and the package declares them in the ``zarr.data_type`` entry point
group.  ``import computable_flows_shim_zarr`` is enough for ``zarr.open_group(path)["state/w"][...]``,
``xarray.open_zarr`` and dask to read such leaves, in a process that never imports the
checkpoint library: it is a top-level module of its own, importing only numpy, ml_dtypes and
zarr (not JAX).

Stored layout (the registry's): little-endian, one element per byte for the sub-byte types;
fill values as JSON numbers, or ``"NaN"``, ``"Infinity"``, ``"-Infinity"``, or ``"0x..."``
(the element's bytes, big-endian hex) for the floating types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.common import DataTypeValidationError, HasEndianness, HasItemSize
from zarr.core.dtype.wrapper import ZDType

NAMES = (
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
)
"""The extension names, exactly the ``_EXTENSION`` list of ``computable_flows_shim._format.dtypes``."""


@dataclass(frozen=True, kw_only=True)
class MLDataType(ZDType[Any, Any], HasEndianness, HasItemSize):
    """One ML data type: a subclass per name sets ``_zarr_v3_name`` and ``dtype_cls``."""

    dtype_cls: ClassVar[Any]
    _zarr_v3_name: ClassVar[str]
    _native: ClassVar[np.dtype]

    @classmethod
    def from_native_dtype(cls, dtype: Any) -> Self:
        if not cls._check_native_dtype(dtype):
            raise DataTypeValidationError(f"{dtype!r} is not {cls._zarr_v3_name}")
        return cls(endianness="big" if dtype.byteorder == ">" else "little")

    def to_native_dtype(self) -> Any:
        if self._native.itemsize == 1:
            return self._native
        return self._native.newbyteorder(">" if self.endianness == "big" else "<")

    @classmethod
    def _from_json_v2(cls, data: Any) -> Self:
        raise DataTypeValidationError(f"{cls._zarr_v3_name} is a Zarr v3 extension data type only")

    @classmethod
    def _from_json_v3(cls, data: Any) -> Self:
        if data == cls._zarr_v3_name:
            return cls()
        raise DataTypeValidationError(f"{data!r} is not {cls._zarr_v3_name}")

    def to_json(self, zarr_format: Any) -> Any:
        if zarr_format == 3:
            return self._zarr_v3_name
        raise ValueError(f"{self._zarr_v3_name} is a Zarr v3 extension data type only, not Zarr v{zarr_format}")

    @property
    def item_size(self) -> int:
        return self._native.itemsize

    def _check_scalar(self, data: object) -> bool:
        return isinstance(data, (int, float, np.generic)) and not isinstance(data, bool)

    def cast_scalar(self, data: object) -> Any:
        if not self._check_scalar(data):
            raise TypeError(f"cannot cast {data!r} to {self._zarr_v3_name}")
        return np.asarray(data).astype(self._native)[()]

    def default_scalar(self) -> Any:
        return np.zeros((), self._native)[()]

    def from_json_scalar(self, data: Any, *, zarr_format: Any) -> Any:
        if isinstance(data, str):
            if data.startswith("0x"):
                raw = bytes.fromhex(data[2:])
                if len(raw) != self._native.itemsize:
                    raise TypeError(f"fill value {data!r}: {len(raw)} bytes, {self._zarr_v3_name} has {self.item_size}")
                return np.frombuffer(raw, self._native.newbyteorder(">"))[0].astype(self._native)
            special = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
            if data in special and self._is_float:
                return np.asarray(special[data]).astype(self._native)[()]
            raise TypeError(f"fill value {data!r} is not valid for {self._zarr_v3_name}")
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return self.cast_scalar(data)
        raise TypeError(f"fill value {data!r} is not valid for {self._zarr_v3_name}")

    def to_json_scalar(self, data: object, *, zarr_format: Any) -> Any:
        value = self.cast_scalar(data)
        if not self._is_float:
            return int(value)
        f = float(value)
        if math.isnan(f):
            return "NaN"
        if math.isinf(f):
            return "Infinity" if f > 0 else "-Infinity"
        return f

    @property
    def _is_float(self) -> bool:
        return not self._zarr_v3_name.startswith(("int", "uint"))


def _data_type(name: str) -> type[MLDataType]:
    native = np.dtype(getattr(ml_dtypes, name))
    cls = type(
        "".join(p.capitalize() for p in name.split("_")),
        (MLDataType,),
        {"__module__": __name__, "_zarr_v3_name": name, "dtype_cls": type(native), "_native": native},
    )
    return dataclass(frozen=True, kw_only=True)(cls)


Bfloat16 = _data_type("bfloat16")
Float8E3m4 = _data_type("float8_e3m4")
Float8E4m3 = _data_type("float8_e4m3")
Float8E4m3b11fnuz = _data_type("float8_e4m3b11fnuz")
Float8E4m3fn = _data_type("float8_e4m3fn")
Float8E4m3fnuz = _data_type("float8_e4m3fnuz")
Float8E5m2 = _data_type("float8_e5m2")
Float8E5m2fnuz = _data_type("float8_e5m2fnuz")
Float8E8m0fnu = _data_type("float8_e8m0fnu")
Float6E2m3fn = _data_type("float6_e2m3fn")
Float6E3m2fn = _data_type("float6_e3m2fn")
Float4E2m1fn = _data_type("float4_e2m1fn")
Int2 = _data_type("int2")
Int4 = _data_type("int4")
Uint2 = _data_type("uint2")
Uint4 = _data_type("uint4")

DATA_TYPES: dict[str, type[MLDataType]] = {c._zarr_v3_name: c for c in MLDataType.__subclasses__()}

# zarr-python 3.1 collects the ``zarr.data_type`` entry points this package declares but does not
# load them when it reads metadata (its own tests call ``data_type_registry._lazy_load()``), so
# importing this module registers the types itself; once zarr loads its entry points, installing
# the package will be enough.
for _cls in DATA_TYPES.values():
    data_type_registry.register(_cls._zarr_v3_name, _cls)

__all__ = ["NAMES", "DATA_TYPES", "MLDataType", *(c.__name__ for c in DATA_TYPES.values())]
