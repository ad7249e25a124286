"""Writes the golden checkpoint of format v2 (committed under tests/golden/v2/): compressed
arrays (spec/FORMAT.md section 8.1), zstd and blosc (inner zstd and lz4, with and without
byte shuffle), an edge chunk, an array the switch-off rule left uncompressed, and the
format's data types.

Run once when format v2 was frozen:  python tests/golden/make_golden_v2.py
Never regenerate it for a later format version: write make_golden_v3.py instead,
and keep this checkpoint so the test proves old checkpoints stay readable.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
STORE = os.path.join(HERE, "v2")
CHECKPOINT_ID = "golden-i000000000007"


def expected_state() -> dict:
    """The state stored in the golden checkpoint."""
    rng = np.random.default_rng(20261203)
    sparse = np.zeros((1100, 1024), np.float32)  # 4.3 MiB: two chunks, the second an edge chunk
    idx = rng.integers(0, sparse.size, 2000)
    sparse.reshape(-1)[idx] = rng.standard_normal(2000).astype(np.float32)
    return {
        "zstd": {
            "sparse": sparse,
            "bfloat16": np.repeat(rng.standard_normal(64), 16).astype(ml_dtypes.bfloat16).reshape(32, 32),
            "int64": np.arange(-500, 500, dtype=np.int64),
            "complex64": (np.arange(256) * (1 + 1j)).astype(np.complex64),
            "bool": np.arange(300) % 3 == 0,
            "float8_e4m3fn": np.zeros(200, ml_dtypes.float8_e4m3fn),
        },
        "blosc": {
            "float64": np.linspace(0.0, 1.0, 4096),
            "float16": np.repeat(rng.standard_normal(32), 8).astype(np.float16),
            "uint16": np.arange(3000, dtype=np.uint16),
        },
        "blosc_lz4": np.tile(np.arange(100, dtype=np.int32), 20),
        "random": rng.standard_normal(2048).astype(np.float32),  # does not shrink: stored uncompressed
        "scalar0d": np.float64(-0.0),  # 8 bytes: stored uncompressed
        "plain": np.arange(6, dtype=np.int32),  # uncompressed by the policy
        "empty": np.zeros((0, 4), np.int32),
        "list": [1, 2.5, None, "text"],
    }


def expected_history() -> dict:
    its = np.arange(0, 40, 10)
    return {
        "iter": its,
        "E": np.array([4.0, 2.0, 1.5, 1.25]),
        "phase": ["RED", "AMBER", "GREEN", "GREEN"],
        "events": [{"type": "RUN_STARTED", "iter": 0, "payload": {"seed": 7}}],
    }


EXPECTED_CODECS = {
    "zstd/sparse": "zstd",
    "zstd/bfloat16": "zstd",
    "zstd/int64": "zstd",
    "zstd/complex64": "zstd",
    "zstd/bool": "zstd",
    "zstd/float8_e4m3fn": "zstd",
    "blosc/float64": "blosc",
    "blosc/float16": "blosc",
    "blosc/uint16": "blosc",
    "blosc_lz4": "blosc",
    "random": None,
    "scalar0d": None,
    "plain": None,
    "empty": None,
}
"""The compressor each array was written with (None: only ``bytes`` and ``crc32c``)."""


def policy(path: str, array) -> object:
    """The per-leaf compression the golden checkpoint was written with."""
    from computable_flows_shim import Compression

    if path.startswith("zstd/"):
        return Compression("zstd", level=5)
    if path.startswith("blosc/"):
        return "blosc"
    if path == "blosc_lz4":
        return Compression("blosc", cname="lz4", shuffle=False)
    if path in ("random", "scalar0d", "empty"):
        return "zstd"
    return None


def main() -> None:
    from computable_flows_shim import CheckpointManager

    mgr = CheckpointManager(STORE, compression=policy)
    cid = mgr.create_checkpoint(
        "golden",
        7,
        expected_state(),
        {"step_size": 0.1},
        telemetry_history=expected_history(),
        metadata={"purpose": "format v2 golden checkpoint"},
    )
    assert cid == CHECKPOINT_ID
    print(cid)


if __name__ == "__main__":
    main()
