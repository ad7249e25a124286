"""Writes the golden checkpoint of format v3 (committed under tests/golden/v3/): packed leaves
(spec/FORMAT.md section 8.2) in one pack per data type, 13 of them (bfloat16, float8_e4m3fn, int4,
bool and complex64 among them), two to a pack for float32 and bfloat16 (the second one 64-byte
aligned after zeros), numpy 0-d scalars, PRNG keys of two implementations sharing the uint32 pack
with a plain leaf; beside them the leaves that are never packed: one above the 64 KiB limit, one
with compression asked for (so the checkpoint also has a zstd array), an empty one; plus Python
scalars and None.

Run once when format v3 was frozen:  python tests/golden/make_golden_v3.py
Never regenerate it for a later format version: write make_golden_v4.py instead,
and keep this checkpoint so the test proves old checkpoints stay readable.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
STORE = os.path.join(HERE, "v3")
CHECKPOINT_ID = "golden-i000000000003"
KEYS = {"threefry": "threefry2x32", "rbg": "rbg"}
"""The PRNG keys of ``state["rng"]`` (stored as key data: ``expected_state`` holds it as uint32)."""


def expected_state() -> dict:
    """The state stored in the golden checkpoint (PRNG key data as uint32, ``rng/<name>_data``)."""
    rng = np.random.default_rng(20261205)
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.0], np.float32)  # NaN, -0, subnormal
    return {
        "layer": {
            "w": rng.standard_normal((3, 5)).astype(np.float32),
            "b": special,  # second leaf of packed/float32, 64-byte aligned after "w" (15 elements)
            "scale": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
            "shift": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
        },
        "dtypes": {
            "int8": np.arange(-5, 6, dtype=np.int8),
            "uint16": rng.integers(0, 1 << 16, size=9, dtype=np.uint16),
            "int64": np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max], np.int64),
            "uint32": np.array([0, 1, 0xFFFFFFFF], np.uint32),  # shares packed/uint32 with the keys
            "bool": rng.integers(0, 2, size=(2, 3)).astype(bool),
            "complex64": (np.arange(3) * (1 - 2j)).astype(np.complex64),
            "float16": rng.standard_normal(5).astype(np.float16),
            "float8_e4m3fn": rng.integers(0, 256, size=6, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn),
            "int4": np.array([-8, -1, 0, 7], dtype=ml_dtypes.int4),
        },
        "step": np.int32(1234),  # numpy 0-d scalars: packed, restored as numpy scalars
        "lr": np.float64(-0.0),
        "big": np.arange(20000, dtype=np.float32) * np.float32(0.5),  # 80000 bytes: above the limit, its own array
        "zstd": np.zeros(1000, np.int64),  # compression asked for: never packed
        "empty": np.zeros((0, 4), np.int32),  # no element: never packed
        "rng": {
            "threefry_data": np.array([0, 42], dtype=np.uint32),
            "rbg_data": np.array([1, 2, 3, 4], dtype=np.uint32),
        },
        "list": [1, 2.5, None, "text", True, complex(1, -2)],
        "none": None,
    }


def stored_state() -> dict:
    """``expected_state`` with the PRNG keys as typed keys (what was saved)."""
    import jax

    state = expected_state()
    rng = state["rng"]
    for name, impl in KEYS.items():
        rng[name] = jax.random.wrap_key_data(rng.pop(f"{name}_data"), impl=impl)
    return state


def expected_history() -> dict:
    return {
        "iter": np.arange(0, 30, 10),
        "E": np.array([3.0, 2.0, 1.0]),
        "phase": ["RED", "AMBER", "GREEN"],
        "events": [{"type": "RUN_STARTED", "iter": 0, "payload": {"seed": 3}}],
    }


EXPECTED_PACKED = {
    "layer/w": "float32",
    "layer/b": "float32",
    "layer/scale": "bfloat16",
    "layer/shift": "bfloat16",
    "dtypes/int8": "int8",
    "dtypes/uint16": "uint16",
    "dtypes/int64": "int64",
    "dtypes/uint32": "uint32",
    "dtypes/bool": "bool",
    "dtypes/complex64": "complex64",
    "dtypes/float16": "float16",
    "dtypes/float8_e4m3fn": "float8_e4m3fn",
    "dtypes/int4": "int4",
    "step": "int32",
    "lr": "float64",
    "rng/threefry": "uint32",
    "rng/rbg": "uint32",
}
"""The pack of each packed leaf, by path."""

EXPECTED_UNPACKED = {"big": None, "zstd": "zstd", "empty": None}
"""The leaves stored under state/ and their compressor (None: only ``bytes`` and ``crc32c``)."""


def policy(path: str, array) -> object:
    """The per-leaf compression the golden checkpoint was written with."""
    return "zstd" if path == "zstd" else None


def main() -> None:
    from computable_flows_shim import CheckpointManager

    mgr = CheckpointManager(STORE, compression=policy)  # pack_max_bytes: the default, 64 KiB
    cid = mgr.create_checkpoint(
        "golden",
        3,
        stored_state(),
        {"step_size": 0.1},
        telemetry_history=expected_history(),
        metadata={"purpose": "format v3 golden checkpoint"},
    )
    assert cid == CHECKPOINT_ID
    print(cid)


if __name__ == "__main__":
    main()
