"""A writer process for crash tests: saves deterministic checkpoints until killed.

Usage: python _writer.py STORE RUN_ID START_ITERATION
Prints "ready" once imported, then "saved <iteration>" after each commit.
"""

import sys

import numpy as np


def make_state(iteration: int) -> dict:
    """Deterministic from the iteration alone, so a reader can check any checkpoint."""
    rng = np.random.default_rng(iteration)
    return {
        "x": rng.standard_normal((512, 1024), dtype=np.float32),  # 2 MiB, 1 chunk
        "big": rng.integers(0, 2**31, size=(3, 1024, 1024), dtype=np.int32).view(np.float32),  # 12 MiB, 3 chunks
        "opt": {"mu": rng.standard_normal(1000), "count": np.int64(iteration), "lr": 0.01},
        "leaves": [np.full(7, iteration, np.int16) for _ in range(20)],
    }


def history(iteration: int) -> dict:
    its = np.arange(iteration + 1)
    return {
        "iter": its,
        "E": 1.0 / (its + 1.0),
        "phase": ["GREEN"] * len(its),
        "events": [{"type": "CHECKPOINT_CREATED", "iter": int(i)} for i in range(0, iteration + 1, 10)],
    }


def main() -> None:
    from computable_flows_shim import CheckpointManager

    store, run_id, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mgr = CheckpointManager(store)
    print("ready", flush=True)
    it = start
    while True:
        mgr.create_checkpoint(run_id, it, make_state(it), {"seed": it}, telemetry_history=history(it))
        print(f"saved {it}", flush=True)
        it += 1


if __name__ == "__main__":
    main()
