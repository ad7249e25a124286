"""User values (flow_config, certificates, metadata, event payloads) -> strict JSON.

Zarr metadata must be strict JSON (tensorstore refuses NaN literals), so
non-finite floats become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``,
the convention Zarr v3 uses for fill values.  Anything else that is not JSON
raises MetadataError naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from computable_flows_shim.errors import MetadataError

MAX_DEPTH = 64


def to_json(value: Any, where: str, _depth: int = 0) -> Any:
    if _depth > MAX_DEPTH:
        raise MetadataError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        x = float(value)
        return x if math.isfinite(x) else ("NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity"))
    if hasattr(value, "shape") and hasattr(value, "dtype") and getattr(value, "shape", None) == ():
        return to_json(np.asarray(value).item(), where, _depth)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise MetadataError(f"{where}: key {k!r} is not a str (JSON object keys are strings)")
            out[k] = to_json(v, f"{where}[{k!r}]", _depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(v, f"{where}[{i}]", _depth + 1) for i, v in enumerate(value)]
    raise MetadataError(
        f"{where}: {type(value).__name__} is not JSON-representable (use dicts, lists, str, int, float, bool, None)"
    )
