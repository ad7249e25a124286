"""Writes the golden checkpoint of format v1 (committed under tests/golden/v1/).

Run once when format v1 was frozen:  python tests/golden/make_golden_v1.py
Never regenerate it for a later format version: write make_golden_v2.py instead,
and keep this checkpoint so the test proves old checkpoints stay readable.
"""

from __future__ import annotations

import collections
import os

import ml_dtypes
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
STORE = os.path.join(HERE, "v1")
CHECKPOINT_ID = "golden-i000000000042"
Pair = collections.namedtuple("Pair", "left right")


def expected_state() -> dict:
    """The state stored in the golden checkpoint (PRNG key data as uint32)."""
    rng = np.random.default_rng(20261124)
    arrays = {
        name: rng.integers(0, 256, size=(3, 5), dtype=np.uint8).view(dt)
        if np.dtype(dt).itemsize == 1
        else rng.standard_normal((3, 5)).astype(dt)
        for name, dt in [
            ("float16", np.float16),
            ("float32", np.float32),
            ("float64", np.float64),
            ("bfloat16", ml_dtypes.bfloat16),
            ("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
            ("float8_e5m2", ml_dtypes.float8_e5m2),
            ("complex64", np.complex64),
            ("complex128", np.complex128),
        ]
    }
    for dt in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        arrays[np.dtype(dt).name] = rng.integers(np.iinfo(dt).min, np.iinfo(dt).max, size=(4,), dtype=dt, endpoint=True)
    arrays["bool"] = rng.integers(0, 2, size=(2, 3)).astype(bool)
    arrays["int4"] = np.array([-8, -1, 0, 7], dtype=ml_dtypes.int4)
    return {
        "dtypes": arrays,
        "chunked": np.arange(3 * 1024 * 1024, dtype=np.float32).reshape(3, 1024, 1024)[:, :8, :],  # sliced: small
        "scalar0d": np.float64(-0.0),
        "empty": np.zeros((0, 4), np.int32),
        "list": [1, 2.5, None, "text", True, complex(1, -2), float("inf")],
        "tuple": (np.arange(3), Pair(np.ones(2, np.float32), {"a/b": np.int64(9), "": np.array([1], np.uint8)})),
        "rng": {"key_data": np.array([0, 42], dtype=np.uint32)},
    }


def expected_history() -> dict:
    its = np.arange(0, 50, 10)
    return {
        "iter": its,
        "E": np.array([5.0, 3.0, 2.0, 1.5, 1.25]),
        "grad_norm": np.array([2.0, 1.0, 0.5, 0.25, 0.125]),
        "phase": ["RED", "AMBER", "GREEN", "GREEN", "GREEN"],
        "events": [
            {"type": "RUN_STARTED", "iter": 0, "payload": {"seed": 7}},
            {"type": "CHECKPOINT_CREATED", "iter": 40, "payload": {}},
        ],
    }


def main() -> None:
    import jax

    from computable_flows_shim import CheckpointManager

    state = expected_state()
    state["rng"]["key"] = jax.random.wrap_key_data(state["rng"].pop("key_data"), impl="threefry2x32")
    mgr = CheckpointManager(STORE)
    cid = mgr.create_checkpoint(
        "golden",
        42,
        state,
        {"step_size": 0.1, "operator": "blur", "levels": 3},
        telemetry_history=expected_history(),
        certificates={"eta_dd": 0.8, "gamma": 0.05},
        metadata={"purpose": "format v1 golden checkpoint"},
    )
    assert cid == CHECKPOINT_ID
    print(cid)


if __name__ == "__main__":
    main()
