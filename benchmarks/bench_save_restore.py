"""Save/restore throughput of a pytree of float32 leaves, beside np.save/np.load of the
same bytes measured in the same run.  Prints a table of medians after a warm-up.

    python benchmarks/bench_save_restore.py --size-gib 1 --repeats 5

Methods:
  cfs save (durable)    CheckpointManager.create_checkpoint, fsync of every file and dir + rename
  cfs save (no fsync)   the same with durable=False
  np.save               one .npy file per leaf (no fsync: what np.save does)
  np.save + fsync       the same, each file fsynced (a fair reference for durable saves)
  cfs restore           CheckpointManager.load_checkpoint (every chunk CRC-checked)
  np.load               np.load of each .npy file into memory
Restores read from the page cache for both cfs and numpy (the files were just written).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np


def make_state(size_gib: float, leaves: int) -> dict:
    n = int(size_gib * (1 << 30)) // 4 // leaves
    rng = np.random.default_rng(0)
    return {f"leaf{i}": rng.standard_normal(n, dtype=np.float32).reshape(-1, 1024) for i in range(leaves)}


def np_save(state: dict, d: str, fsync: bool) -> None:
    os.makedirs(d)
    for k, v in state.items():
        with open(os.path.join(d, k + ".npy"), "wb") as f:
            np.save(f, v)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def np_load(state_keys, d: str) -> dict:
    return {k: np.load(os.path.join(d, k + ".npy")) for k in state_keys}


def timed(fn, repeats: int, setup=None) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # first run is the warm-up
        if setup:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--leaves", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary dir under ./bench-out)")
    args = ap.parse_args()

    from computable_flows_shim import CheckpointManager

    base = args.dir or os.path.join(os.getcwd(), "bench-out")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(dir=base)
    state = make_state(args.size_gib, args.leaves)
    nbytes = sum(v.nbytes for v in state.values())
    gib = nbytes / (1 << 30)
    counter = iter(range(10**9))
    results: dict[str, list[float]] = {}

    try:
        for durable in (True, False):
            mgr = CheckpointManager(os.path.join(work, f"cfs-{durable}"), durable=durable)
            last: list[str] = []

            def save(mgr=mgr, last=last):
                last.append(mgr.create_checkpoint("bench", next(counter), state, {}))

            def clean(mgr=mgr, last=last):
                while last:
                    mgr.delete_checkpoint(last.pop())

            results[f"cfs save ({'durable' if durable else 'no fsync'})"] = timed(save, args.repeats, clean)
            if durable:
                cid = last[-1]
                results["cfs restore"] = timed(lambda mgr=mgr, cid=cid: mgr.load_checkpoint(cid), args.repeats)
                restored = mgr.load_checkpoint(cid)["state"]
                assert all(restored[k].tobytes() == v.tobytes() for k, v in state.items()), "restore mismatch"
            clean()

        for fsync in (False, True):
            d = os.path.join(work, "npy")
            results["np.save + fsync" if fsync else "np.save"] = timed(
                lambda fsync=fsync: np_save(state, d, fsync), args.repeats, lambda: shutil.rmtree(d, ignore_errors=True)
            )
        results["np.load"] = timed(lambda: np_load(state.keys(), os.path.join(work, "npy")), args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    reference = {"cfs save (durable)": "np.save + fsync", "cfs save (no fsync)": "np.save", "cfs restore": "np.load"}
    med = {name: statistics.median(ts) for name, ts in results.items()}
    print(
        f"\n{gib:.2f} GiB in {args.leaves} float32 leaves, median of {args.repeats} runs after 1 warm-up, "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, numpy {np.__version__}"
    )
    print(f"{'method':<22} {'median s':>9} {'GiB/s':>7}  {'ratio vs reference':<28} all runs (s)")
    for name, ts in results.items():
        ref = reference.get(name)
        ratio = f"{med[ref] / med[name]:.2f}x {ref}" if ref else ""
        print(f"{name:<22} {med[name]:9.3f} {gib / med[name]:7.2f}  {ratio:<28} " + " ".join(f"{t:.3f}" for t in ts))
    print(
        f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20):.2f} GiB "
        f"(state itself: {gib:.2f} GiB)"
    )


if __name__ == "__main__":
    main()
