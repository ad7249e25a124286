"""Save throughput of one global float32 array saved by 1 process (8 CPU devices) and by 2 and
4 JAX processes (``jax.distributed.initialize`` on localhost, 8 devices in all: 4 and 2 per
process), every process writing its own shards into one staging directory, process 0
committing.  Medians of several runs after one warm-up run; every run printed.

    python benchmarks/bench_multiprocess.py --size-mib 512 --repeats 5

A run is timed on process 0, from a barrier that starts every process together to the return
of ``create_checkpoint`` (which, with several processes, returns after the commit barrier).
Every save is durable (fsync of every file and directory) and uses a fresh run id (no
incremental hard links); the checkpoint is deleted between runs.  The processes share this
machine's CPUs and disk, so this measures the protocol's cost and the parallelism of writing
from several processes, not a cluster's aggregate bandwidth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

DEVICES = 8


def worker(pid: int, n: int, port: int, store: str, size_mib: int, repeats: int, durable: bool) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES // n}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    if n > 1:
        jax.distributed.initialize(f"localhost:{port}", n, pid, heartbeat_timeout_seconds=120)
        from jax._src.distributed import global_state

        client = global_state.client
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from computable_flows_shim import CheckpointManager

    rows = size_mib * (1 << 20) // 4 // 1024
    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
    sharding = NamedSharding(Mesh(devices, ("d",)), P("d"))

    def block(index):
        r = index[0]
        start, stop = r.start or 0, r.stop if r.stop is not None else rows
        return np.random.default_rng(start).standard_normal((stop - start, 1024), dtype=np.float32)

    x = jax.make_array_from_callback((rows, 1024), sharding, block)
    mgr = CheckpointManager(store, durable=durable)
    times = []
    for i in range(repeats + 1):  # run 0 is the warm-up
        if n > 1:
            client.wait_at_barrier(f"bench/start/{i}", 600_000)
        t = time.perf_counter()
        cid = mgr.create_checkpoint(f"b{i}", 1, {"x": x}, {})
        dt = time.perf_counter() - t
        if i:
            times.append(dt)
        if pid == 0:
            mgr.delete_checkpoint(cid)
    if pid == 0:
        print("TIMES", " ".join(f"{t:.4f}" for t in times), flush=True)


def run_config(n: int, store: str, size_mib: int, repeats: int, durable: bool) -> list[float]:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [str(n), str(port), store, str(size_mib), str(repeats), str(int(durable))]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(i), *args], stdout=subprocess.PIPE, text=True, env=env
        )
        for i in range(n)
    ]
    outs = [p.communicate(timeout=3600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{n} processes: a worker failed ({[p.returncode for p in procs]})")
    (line,) = [ln for ln in outs[0].splitlines() if ln.startswith("TIMES")]
    return [float(t) for t in line.split()[1:]]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        pid, n, port, store, size, repeats, durable = sys.argv[2:9]
        worker(int(pid), int(n), int(port), store, int(size), int(repeats), bool(int(durable)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--processes", default="1,2,4", help="process counts to compare (divisors of 8)")
    ap.add_argument("--no-fsync", action="store_true", help="durable=False")
    ap.add_argument("--dir", default=None, help="where to write (default: ./bench-out)")
    args = ap.parse_args()

    import numpy as np

    base = args.dir or os.path.join(os.getcwd(), "bench-out")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(dir=base)
    gib = args.size_mib / 1024
    res: dict[str, list[float]] = {}
    try:
        for n in (int(c) for c in args.processes.split(",")):
            label = f"{n} process{'es' if n > 1 else ''} x {DEVICES // n} devices"
            res[label] = run_config(n, os.path.join(work, f"p{n}"), args.size_mib, args.repeats, not args.no_fsync)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{args.size_mib} MiB float32 array sharded over {DEVICES} CPU devices, "
        f"{'durable' if not args.no_fsync else 'no fsync'} saves; median of {args.repeats} runs after a warm-up; "
        f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}, numpy {np.__version__}"
    )
    print(f"{'saved by':<28} {'median s':>9} {'GiB/s':>7}   all runs (s)")
    for k, ts in res.items():
        med = statistics.median(ts)
        print(f"{k:<28} {med:9.3f} {gib / med:7.2f}   " + " ".join(f"{t:.3f}" for t in ts))


if __name__ == "__main__":
    main()
