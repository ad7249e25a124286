"""A run as a dataset: opening the default example's run with ``open_run_states`` and computing
the distance of every checkpoint to the final state, with the chunk files each step opens.

    python benchmarks/bench_run_states.py                      # deblur2d, 8000 iterations, every 100
    python benchmarks/bench_run_states.py --iters 2000 --repeats 3 --open-checkpoints 0

Opens are counted by wrapping ``os.open`` in this process: the package's reader opens every
chunk file of a local checkpoint through it (``_format.arrays.open_regular``), once per read;
only the state's chunk files are counted (a whole load also reads the telemetry).
"Distinct chunks" are the distinct (device, inode) pairs among the run's chunk files, hard links
counted once; "blocks" are checkpoints x chunks, what reading each checkpoint on its own opens
(the last row does exactly that, with ``load_checkpoint``).  Times are medians of ``--repeats``
runs after a warm-up, page cache warm.  ``--open-checkpoints N`` also times opening a run of N
checkpoints of the same leaves (written with ``durable=False`` to save time; 0 skips it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

from computable_flows_shim import CheckpointManager, distance_to, make_example, open_run_states, run_flow


class ChunkOpens:
    """Counts ``os.open`` calls on state chunk files (under ``state/``, not a ``zarr.json``) while active."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._real = os.open

    def __enter__(self) -> ChunkOpens:
        real = self._real

        def counting(path, *a, **k):
            p = os.fspath(path)
            if f"{os.sep}state{os.sep}" in p and os.path.basename(p) != "zarr.json":
                self.paths.append(p)
            return real(path, *a, **k)

        os.open = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc) -> None:
        os.open = self._real  # type: ignore[assignment]


def chunk_files(mgr: CheckpointManager, ids) -> list[str]:
    out = []
    for cid in ids:
        for base, _dirs, files in os.walk(os.path.join(mgr.checkpoint_path(cid), "state")):
            out += [os.path.join(base, f) for f in files if f != "zarr.json"]
    return out


def timed(f: Callable[[], object], repeats: int) -> list[float]:
    f()  # warm-up: imports, page cache
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return out


def load_each(mgr: CheckpointManager, ids: list[str]) -> np.ndarray:
    """The baseline: load every checkpoint whole and compare in numpy."""
    final = mgr.load_checkpoint(ids[-1])["state"]["x"].astype(np.float64)
    return np.array([np.linalg.norm(mgr.load_checkpoint(c)["state"]["x"] - final) for c in ids])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", default="deblur2d")
    ap.add_argument("--iters", type=int, default=None, help="default: the example's own (8000 for deblur2d)")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--open-checkpoints", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory)")
    args = ap.parse_args()
    spec, y, default_iters = make_example(args.example)
    iters = args.iters or default_iters
    base = tempfile.mkdtemp(prefix="cfs-bench-states-", dir=args.dir)
    try:
        mgr = CheckpointManager(os.path.join(base, "runs"))  # durable, as cfs run
        t = time.perf_counter()
        r = run_flow(spec, y, iters=iters, checkpoint_manager=mgr, checkpoint_interval=args.every, run_id="bench")
        flow_s = time.perf_counter() - t
        ids = r.checkpoints

        with ChunkOpens() as at_open:
            ds = open_run_states(mgr, "bench")
        files = chunk_files(mgr, ids)
        distinct = {(st.st_dev, st.st_ino) for st in map(os.stat, files)}
        leaves = ", ".join(f"{n} {'x'.join(map(str, v.shape[1:])) or '()'} {v.dtype}" for n, v in ds.data_vars.items())
        print(f"\n{args.example}: {iters} iterations ({flow_s:.1f} s), {len(ids)} checkpoints; leaves: {leaves}")
        print(f"median of {args.repeats} runs after a warm-up, page cache warm\n")
        print(f"{'what':<46} {'median s':>9} {'opens':>7} {'distinct':>9} {'blocks':>7}   all runs (s)")

        def row(what: str, ts: list[float], opens: int | str, dist: int | str = "", blocks: int | str = "") -> None:
            runs = " ".join(f"{t:.3f}" for t in ts)
            print(f"{what:<46} {statistics.median(ts):9.3f} {opens!s:>7} {dist!s:>9} {blocks!s:>7}   {runs}")

        row("open_run_states (metadata only)", timed(lambda: open_run_states(mgr, "bench"), args.repeats),
            len(at_open.paths))
        with ChunkOpens() as c:
            d = distance_to(ds).compute()
        assert np.all(d["x"].values[-1] == 0.0)
        ts = timed(lambda: distance_to(ds).compute(), args.repeats)
        row("distance_to(final), every leaf", ts, len(c.paths), len(distinct), len(files))
        x_files = [f for f in files if f"{os.sep}state{os.sep}x{os.sep}" in f]
        x_distinct = {(st.st_dev, st.st_ino) for st in map(os.stat, x_files)}
        with ChunkOpens() as c:
            dx = distance_to(ds["x"]).compute()
        ts = timed(lambda: distance_to(ds["x"]).compute(), args.repeats)
        row("distance_to(final), x", ts, len(c.paths), len(x_distinct), len(x_files))
        with ChunkOpens() as c:
            base_x = load_each(mgr, ids)
        np.testing.assert_allclose(base_x, dx.values, rtol=1e-9)
        row("baseline: load_checkpoint each, numpy", timed(lambda: load_each(mgr, ids), args.repeats), len(c.paths),
            len(distinct), len(files))

        if args.open_checkpoints:
            many = CheckpointManager(os.path.join(base, "many"), durable=False)
            last = mgr.load_checkpoint(ids[-1])["state"]
            for i in range(args.open_checkpoints):  # the run's leaves; x changes, y and alpha are linked
                many.create_checkpoint("many", i, {**last, "x": last["x"] + np.float32(i)})
            with ChunkOpens() as c:
                open_run_states(many, "many")
            ts = timed(lambda: open_run_states(many, "many"), args.repeats)
            row(f"open_run_states, {args.open_checkpoints} checkpoints", ts, len(c.paths))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
