"""Incremental saves, lazy partial reads, listing and many small leaves: the figures of
issue 4 that are not raw throughput.  Medians of several runs after a warm-up.

    python benchmarks/bench_features.py            # ~1-2 minutes, writes up to ~5 GiB under ./bench-out
    python benchmarks/bench_features.py --quick    # smaller sizes
    python benchmarks/bench_features.py --smoke    # the smallest sizes, one run (CI: that it still runs)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import numpy as np

from computable_flows_shim import CheckpointManager
from computable_flows_shim.flow._recorder import COLUMNS, TelemetryRecorder

MiB, GiB = 1 << 20, 1 << 30


def timed(fn, repeats: int) -> list[float]:
    out = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        fn()
        if i:
            out.append(time.perf_counter() - t)
    return out


_SAMPLE = {"E": 0.5, "grad_norm": 1.0, "alpha": 0.1, "phase": "GREEN", "sparsity_wx": 0.5, "eta_dd": 0.01, "gamma": 0.2}


def _column_like(name: str, dtype: object, n: int) -> np.ndarray:
    """A telemetry column of ``n`` samples as the flow records them."""
    if name == "iter":
        return np.arange(n)
    if dtype is object:
        return np.array(["GREEN"] * n, dtype=object)
    return np.linspace(1, 0, n)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="the smallest sizes, one run, no figures to quote")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=os.path.join(os.getcwd(), "bench-out"), help="work directory")
    args = ap.parse_args()
    if args.smoke:
        args.quick, args.repeats = True, 1
    base = args.dir
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(dir=base)
    rows: list[tuple[str, str, str]] = []
    try:
        # 1. incremental: 10 leaves, one changes between saves
        n = (4 if args.smoke else 64 if args.quick else 1024) * MiB // 10 // 4
        rng = np.random.default_rng(0)
        state = {f"leaf{i}": rng.standard_normal(n, dtype=np.float32) for i in range(10)}
        mgr = CheckpointManager(os.path.join(work, "inc"))
        it = iter(range(1, 10**6))
        full_t = timed(lambda: mgr.create_checkpoint(f"full{next(it)}", 1, state, {}), args.repeats)
        full_b = mgr.last_save_stats.bytes_written
        inc_b = []

        def inc_save():
            state["leaf0"] = state["leaf0"] + 1.0
            mgr.create_checkpoint("inc", next(it), state, {})
            inc_b.append(mgr.last_save_stats.bytes_written)

        inc_t = timed(inc_save, args.repeats)
        size = sum(v.nbytes for v in state.values()) / MiB
        rows.append(
            (
                "incremental save, 10% of leaves changed",
                f"{statistics.median(inc_t):.3f} s vs {statistics.median(full_t):.3f} s full",
                f"writes {statistics.median(inc_b[1:]) / full_b:.1%} of a full save's bytes ({size:.0f} MiB state)",
            )
        )
        shutil.rmtree(os.path.join(work, "inc"))

        # 2. telemetry cost vs history length
        mgr = CheckpointManager(os.path.join(work, "tel"))
        for hist_len in (1_000, 70_000) if args.smoke else (10_000, 1_000_000, 4_000_000):
            cols = {
                "iter": np.arange(hist_len),
                "E": np.linspace(1, 0, hist_len),
                "grad_norm": np.ones(hist_len),
                "phase": np.array(["GREEN"] * hist_len, dtype=object),
            }
            mgr.create_checkpoint(f"t{hist_len}", 0, {"x": np.ones(4)}, {}, telemetry_history=cols)
            k = iter(range(1, 10**6))

            def save_more(cols=cols, hist_len=hist_len, k=k):
                mgr.create_checkpoint(f"t{hist_len}", next(k), {"x": np.ones(4)}, {}, telemetry_history=cols)

            ts = timed(save_more, args.repeats)
            rows.append(
                (
                    f"save with a {hist_len:,}-sample history",
                    f"{statistics.median(ts) * 1e3:.1f} ms",
                    f"{mgr.last_save_stats.bytes_written / MiB:.2f} MiB written",
                )
            )

            # the flow's recorder (an append-only log): 100 samples appended before each save
            log_cols = {k: _column_like(k, dt, hist_len) for k, dt in COLUMNS.items()}
            rec = TelemetryRecorder.from_history(log_cols, 1)
            mgr.create_checkpoint(f"log{hist_len}", 0, {"x": np.ones(4)}, {}, telemetry_history=rec.history())

            def save_log(rec=rec, hist_len=hist_len, k=k):
                i = next(k)
                for j in range(100):
                    rec.record(hist_len + 100 * i + j, **_SAMPLE)
                mgr.create_checkpoint(f"log{hist_len}", i, {"x": np.ones(4)}, {}, telemetry_history=rec.history())

            ts = timed(save_log, args.repeats)
            rows.append(
                (
                    f"save with a {hist_len:,}-sample flow recorder history",
                    f"{statistics.median(ts) * 1e3:.1f} ms",
                    f"{mgr.last_save_stats.bytes_written / MiB:.2f} MiB written, 9 columns, 100 samples appended",
                )
            )
        shutil.rmtree(os.path.join(work, "tel"))

        # 3. lazy partial reads of a big leaf
        big_gib = 1 / 64 if args.smoke else 0.25 if args.quick else 4
        rows_n = int(big_gib * GiB) // (4096 * 4)
        mgr = CheckpointManager(os.path.join(work, "lazy"), durable=False)
        big = np.empty((rows_n, 4096), np.float32)
        for i in range(0, rows_n, 8192):
            big[i : i + 8192] = i
        cid = mgr.create_checkpoint("lazy", 1, {"w": big}, {})
        del big
        leaf = mgr.open_checkpoint(cid).state["w"]
        r = np.random.default_rng(1)
        starts = r.integers(0, rows_n - 64, size=50)
        for label, cold in (("warm page cache", False), ("after dropping caches", True)):
            if cold and (args.smoke or not drop_caches()):  # a smoke run leaves the machine's caches alone
                rows.append(("lazy 1 MiB row slice, cold", "n/a", "cannot drop caches here"))
                continue
            ts = []
            for s in starts[:20]:
                before = leaf.chunks_read
                t = time.perf_counter()
                leaf[int(s) : int(s) + 64, :]  # 64 rows x 4096 float32 = 1 MiB
                ts.append(time.perf_counter() - t)
                if cold:
                    drop_caches()
            rows.append(
                (
                    f"lazy 1 MiB row slice of a {big_gib:g} GiB leaf, {label}",
                    f"{statistics.median(ts) * 1e3:.1f} ms (max {max(ts) * 1e3:.1f})",
                    f"{leaf.chunks_read - before} chunk(s) of 4 MiB read per slice",
                )
            )
        t = time.perf_counter()
        col = leaf[:, 7]
        rows.append(
            (
                "lazy column slice (reads every chunk)",
                f"{(time.perf_counter() - t):.2f} s",
                f"{col.nbytes / MiB:.2f} MiB out of {big_gib:g} GiB",
            )
        )
        shutil.rmtree(os.path.join(work, "lazy"))

        # 4. listing many checkpoints
        nlist = 20 if args.smoke else 200 if args.quick else 1000
        mgr = CheckpointManager(os.path.join(work, "list"), durable=False)
        small = {"x": np.ones(1024, np.float32), "y": np.ones(1024, np.float32), "alpha": np.float32(0.1)}
        hist = {"iter": np.arange(100), "E": np.linspace(1, 0, 100), "phase": ["GREEN"] * 100}
        for i in range(nlist):
            mgr.create_checkpoint(
                f"run{i % 10}", i, small, {"op": "blur"}, telemetry_history=hist, certificates={"gamma": 0.1}
            )
        ts = timed(lambda: CheckpointManager(os.path.join(work, "list")).list_checkpoints(), args.repeats)
        rows.append((f"list_checkpoints over {nlist} checkpoints", f"{statistics.median(ts):.3f} s", ""))
        shutil.rmtree(os.path.join(work, "list"))

        # 5. many small leaves
        nleaves = 200 if args.smoke else 2000
        leaves = {f"p{i}": np.full(256, i, np.float32) for i in range(nleaves)}  # 2,000 x 1 KiB
        for durable in (True, False):
            mgr = CheckpointManager(os.path.join(work, f"small{durable}"), durable=durable)
            k = iter(range(10**6))
            ts = timed(lambda mgr=mgr, k=k: mgr.create_checkpoint(f"s{next(k)}", 1, leaves, {}), args.repeats)
            rows.append(
                (
                    f"save {nleaves:,} leaves of 1 KiB ({'durable' if durable else 'no fsync'})",
                    f"{statistics.median(ts):.3f} s",
                    "",
                )
            )
            lt = timed(lambda mgr=mgr: mgr.load_checkpoint("s0-i000000000001"), args.repeats)
            rows.append((f"load {nleaves:,} leaves of 1 KiB", f"{statistics.median(lt):.3f} s", ""))
            shutil.rmtree(os.path.join(work, f"small{durable}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nmedian of {args.repeats} runs after a warm-up, {os.cpu_count()} CPUs")
    w = max(len(r[0]) for r in rows)
    for name, t, note in rows:
        print(f"{name:<{w}}  {t:<32} {note}")


if __name__ == "__main__":
    main()
