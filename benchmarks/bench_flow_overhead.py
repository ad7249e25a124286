"""Cost of checkpointing on the example flows: the same run with no checkpoints and
with a (durable) checkpoint every N iterations, medians of several runs after a warm-up.

    python benchmarks/bench_flow_overhead.py --example deblur2d --iters 2000 --every 100 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from computable_flows_shim import CheckpointManager, make_example, run_flow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", default="deblur2d")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    spec, y, _ = make_example(args.example)
    base = os.path.join(os.getcwd(), "bench-out")
    os.makedirs(base, exist_ok=True)
    run_flow(spec, y, iters=20)  # warm-up: compile
    times: dict[str, list[float]] = {"no checkpoints": [], f"checkpoint every {args.every}": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        run_flow(spec, y, iters=args.iters)
        times["no checkpoints"].append(time.perf_counter() - t)
        d = tempfile.mkdtemp(dir=base)
        try:
            t = time.perf_counter()
            r = run_flow(
                spec,
                y,
                iters=args.iters,
                checkpoint_manager=CheckpointManager(d),
                checkpoint_interval=args.every,
                run_id="bench",
            )
            times[f"checkpoint every {args.every}"].append(time.perf_counter() - t)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    ref = statistics.median(times["no checkpoints"])
    print(
        f"\n{args.example}: {args.iters} iterations, {len(r.checkpoints)} checkpoints per run, "
        f"median of {args.repeats} runs after a warm-up"
    )
    print(f"{'variant':<24} {'median s':>9} {'it/s':>8} {'overhead':>9}   all runs (s)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:<24} {med:9.2f} {args.iters / med:8.0f} {100 * (med / ref - 1):8.1f}%   "
            + " ".join(f"{t:.2f}" for t in ts)
        )


if __name__ == "__main__":
    main()
