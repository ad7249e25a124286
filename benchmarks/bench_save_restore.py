"""Save/restore throughput and peak memory of a pytree of float32 leaves, against
orbax-checkpoint, safetensors, np.save/np.load and `dd conv=fdatasync`, all measured in
the same run.  Medians of several runs after one warm-up run of each method.

    python benchmarks/bench_save_restore.py --size-gib 1 --repeats 5
    python benchmarks/bench_save_restore.py --size-gib 4 --repeats 3

Methods (save):
  cfs durable        CheckpointManager.create_checkpoint: one syncfs of the staging file system (Linux >= 5.8;
                     elsewhere fdatasync of every file and fsync of every dir), rename, fsync of the store
  cfs no fsync       the same with durable=False
  cfs async          create_checkpoint(blocking=False): time until it returns (state copied to host)
  host copy          np.array(leaf) for every leaf: the floor for an async snapshot
  np.save            one .npy per leaf (no fsync)        np.save+fsync: each file fsynced
  safetensors        safetensors.numpy.save_file (no fsync)
  orbax              orbax StandardCheckpointer.save + wait_until_finished (fsyncs: strace shows
                     fsync of its files, as tensorstore's file_io_sync is on by default)
  dd fdatasync       dd if=/dev/zero bs=4M count=<size> conv=fdatasync: this disk's durable bandwidth
Restore: cfs (every chunk CRC-checked), np.load, safetensors.numpy.load_file, orbax restore.
Restores read from the page cache (the files were just written), for every method alike.
"peak MiB" is the largest RSS growth above the RSS before the operation (sampled every 2 ms, after
malloc_trim so that freed memory is not silently reused); the state itself is already in memory.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

_LIBC = ctypes.CDLL("libc.so.6")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Largest RSS growth while the block runs (a sampling thread)."""

    def __enter__(self) -> PeakRSS:
        # hand freed memory back first, so that reuse of an earlier run's pages cannot hide growth
        gc.collect()
        _LIBC.malloc_trim(0)
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def make_state(size_gib: float, leaves: int) -> dict:
    n = int(size_gib * (1 << 30)) // 4 // leaves
    rng = np.random.default_rng(0)
    return {f"leaf{i}": rng.standard_normal(n, dtype=np.float32).reshape(-1, 1024) for i in range(leaves)}


def measure(fn, repeats: int, setup=None) -> tuple[list[float], int]:
    times, peaks = [], []
    for i in range(repeats + 1):  # run 0 is the warm-up
        if setup:
            setup()
        with PeakRSS() as p:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
        if i:
            times.append(dt)
            peaks.append(p.growth)
    return times, max(peaks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--leaves", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-orbax", action="store_true")
    ap.add_argument("--dir", default=None, help="where to write (default: ./bench-out)")
    args = ap.parse_args()

    from computable_flows_shim import CheckpointManager

    base = args.dir or os.path.join(os.getcwd(), "bench-out")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(dir=base)
    state = make_state(args.size_gib, args.leaves)
    gib = sum(v.nbytes for v in state.values()) / (1 << 30)
    res: dict[str, tuple[list[float], int]] = {}
    ids = iter(range(10**9))
    try:
        mb = int(gib * 256)
        ddf = os.path.join(work, "dd.bin")
        res["dd fdatasync"] = measure(
            lambda: subprocess.run(
                ["dd", "if=/dev/zero", f"of={ddf}", "bs=4M", f"count={mb}", "conv=fdatasync"],
                check=True,
                capture_output=True,
            ),
            args.repeats,
            lambda: os.path.exists(ddf) and os.unlink(ddf),
        )
        os.path.exists(ddf) and os.unlink(ddf)

        for label, durable in (("cfs durable", True), ("cfs no fsync", False)):
            mgr = CheckpointManager(os.path.join(work, label.replace(" ", "-")), durable=durable)
            made: list[str] = []

            def clean(mgr=mgr, made=made):
                while made:
                    mgr.delete_checkpoint(made.pop())

            # a fresh run id per save: no incremental linking, every byte written
            res[f"{label} save"] = measure(
                lambda mgr=mgr, made=made: made.append(mgr.create_checkpoint(f"b{next(ids)}", 1, state, {})),
                args.repeats,
                clean,
            )
            if durable:
                cid = made[-1]
                res["cfs restore"] = measure(lambda mgr=mgr, cid=cid: mgr.load_checkpoint(cid), args.repeats)
                back = mgr.load_checkpoint(cid)["state"]
                assert all(back[k].tobytes() == v.tobytes() for k, v in state.items()), "cfs restore mismatch"
                del back

                def async_save(mgr=mgr, made=made):
                    made.append(mgr.create_checkpoint(f"b{next(ids)}", 1, state, {}, blocking=False))

                def finish_and_clean(mgr=mgr, clean=clean):
                    mgr.wait_until_finished()
                    clean()

                res["cfs async (blocking part)"] = measure(async_save, args.repeats, finish_and_clean)
                finish_and_clean()
            clean()
        res["host copy"] = measure(lambda: {k: np.array(v) for k, v in state.items()}, args.repeats)

        npd = os.path.join(work, "npy")

        def np_save(fsync: bool) -> None:
            os.makedirs(npd)
            for k, v in state.items():
                with open(os.path.join(npd, k + ".npy"), "wb") as f:
                    np.save(f, v)
                    if fsync:
                        f.flush()
                        os.fsync(f.fileno())

        res["np.save+fsync save"] = measure(lambda: np_save(True), args.repeats, lambda: shutil.rmtree(npd, True))
        res["np.save save"] = measure(lambda: np_save(False), args.repeats, lambda: shutil.rmtree(npd, True))
        res["np.load restore"] = measure(
            lambda: {k: np.load(os.path.join(npd, k + ".npy")) for k in state}, args.repeats
        )
        shutil.rmtree(npd, True)

        from safetensors.numpy import load_file, save_file

        stf = os.path.join(work, "st.safetensors")
        res["safetensors save"] = measure(
            lambda: save_file(state, stf), args.repeats, lambda: os.path.exists(stf) and os.unlink(stf)
        )
        res["safetensors restore"] = measure(lambda: load_file(stf), args.repeats)
        os.unlink(stf)

        if not args.no_orbax:
            import warnings

            warnings.simplefilter("ignore")
            import jax
            import orbax.checkpoint as ocp

            ck = ocp.StandardCheckpointer()
            od = os.path.join(work, "orbax")
            counter = iter(range(10**9))
            last: list[str] = []

            def orbax_save():
                p = os.path.join(od, str(next(counter)))
                ck.save(p, state)
                ck.wait_until_finished()
                last.append(p)

            res["orbax save"] = measure(orbax_save, args.repeats, lambda: shutil.rmtree(od, True))
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
            res["orbax restore"] = measure(lambda: ck.restore(last[-1], target), args.repeats)
            ck.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(t) for k, (t, _) in res.items()}
    print(
        f"\n{gib:.2f} GiB in {args.leaves} float32 leaves; median of {args.repeats} runs after a warm-up; "
        f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}, numpy {np.__version__}"
    )
    print(f"{'method':<28} {'median s':>9} {'GiB/s':>7} {'peak MiB':>9}   all runs (s)")
    for k, (ts, peak) in res.items():
        print(
            f"{k:<28} {med[k]:9.3f} {gib / med[k]:7.2f} {peak / (1 << 20):9.0f}   " + " ".join(f"{t:.3f}" for t in ts)
        )

    def ratio(a: str, b: str) -> str:
        return f"{med[b] / med[a]:.2f}x" if a in med and b in med else "n/a"

    print("\ntargets (ratio of speeds, higher is better for cfs):")
    rows = [
        ("durable save vs orbax (>= 2x; both durable)", ratio("cfs durable save", "orbax save")),
        ("no-fsync save vs orbax (orbax fsyncs: unlike)", ratio("cfs no fsync save", "orbax save")),
        ("save vs np.save (>= 0.7x)", ratio("cfs no fsync save", "np.save save")),
        ("durable save vs dd fdatasync (>= 0.9x)", ratio("cfs durable save", "dd fdatasync")),
        ("restore vs orbax (>= 2x)", ratio("cfs restore", "orbax restore")),
        ("restore vs np.load (>= 0.7x)", ratio("cfs restore", "np.load restore")),
        ("save vs safetensors", ratio("cfs no fsync save", "safetensors save")),
        ("restore vs safetensors", ratio("cfs restore", "safetensors restore")),
        ("async blocking time / host copy (<= 1.5)", f"{med['cfs async (blocking part)'] / med['host copy']:.2f}"),
    ]
    for name, v in rows:
        print(f"  {name:<44} {v}")


if __name__ == "__main__":
    main()
