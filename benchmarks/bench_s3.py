"""Save/restore throughput to an S3-protocol server (moto_server on loopback, started
here), against plain object PUTs/GETs of the same bytes through the same client, all
measured in the same run, interleaved.  Medians of several runs after one warm-up round.

    python benchmarks/bench_s3.py --size-mib 256 --repeats 3

Methods:
  cfs save        CheckpointManager("s3://...").create_checkpoint: every chunk PUT from memory as it
                  is encoded (16 in flight), the metadata from a local staging directory, then the
                  conditional PUT of the commit record
  raw PUT         obstore.put of the same bytes as 4 MiB objects, 16 in flight (the floor for any
                  client of this server: no encoding, no checksums, no commit)
  cfs incr.       an incremental save: 1 of the 8 leaves differs from the run's previous checkpoint,
                  the other chunks are copied server-side
  cfs load        load_checkpoint from a fresh manager (nothing cached): GET of every object,
                  CRC32C against the commit record and the chunk trailer, decode
  raw GET         obstore.get of the same 4 MiB objects, 16 in flight
  local save/load the same state in a local directory store (durable), for scale

The save and load rows run twice: on loopback, and through a proxy adding --rtt-ms to every
request (a network round trip; the proxy, a Python process, also caps the throughput).

moto_server is a single Python process holding objects in memory: its absolute throughput
says little about a real object store; the ratios to raw PUT/GET say what this package
adds on top of the protocol.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def interleaved(fns: list, repeats: int, after=None) -> list[list[float]]:
    """Times of each function, run in turn (one warm-up round, then ``repeats`` rounds), so that
    a server slowing down or speeding up over time affects every method alike; ``after(i)``
    runs untimed after function ``i`` (to delete what it wrote: moto keeps objects in memory)."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats + 1):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            if r:
                times[i].append(time.perf_counter() - t)
            if after is not None:
                after(i)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--list-count", type=int, default=100, help="checkpoints to list through the latency proxy")
    ap.add_argument("--rtt-ms", type=float, default=20.0, help="milliseconds the proxy adds to every request")
    args = ap.parse_args()

    from s3server import S3Server

    from computable_flows_shim import CheckpointManager

    nbytes = args.size_mib << 20
    leaves = 8
    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.standard_normal(nbytes // leaves // 4).astype(np.float32) for i in range(leaves)}
    blob = np.concatenate([v.view(np.uint8) for v in state.values()])
    pieces = [blob[i : i + (4 << 20)].tobytes() for i in range(0, blob.size, 4 << 20)]

    with S3Server() as srv:
        os.environ.update(srv.env)
        bucket = srv.new_bucket()
        import obstore
        from obstore.store import from_url
        from s3server import DroppingProxy

        from computable_flows_shim import ObjectStore

        pool = ThreadPoolExecutor(16)
        counter = iter(range(1 << 30))

        def throughput(endpoint: str | None) -> list[tuple[str, list[float], str | None]]:
            """Saves and loads, against plain PUTs/GETs, through ``endpoint`` (the server's own if None)."""
            opts = {"endpoint": endpoint} if endpoint else {}
            url = f"s3://{bucket}/bench"
            mgr = CheckpointManager(ObjectStore(url, **opts))
            raw = from_url(f"s3://{bucket}/raw", client_options={"allow_http": True}, **opts)
            saved: list[str] = []
            puts: list[int] = []
            inc: list[str] = []

            def cfs_save() -> None:  # a run of its own each time: no previous checkpoint to copy from
                saved.append(mgr.create_checkpoint(f"bench{next(counter)}", 0, state))

            changed = [{**state, "w0": state["w0"] + k} for k in (1, 2)]  # 1 of 8 leaves differs

            def cfs_incremental() -> None:  # the run's previous checkpoint differs in one leaf
                n = next(counter)
                inc.append(mgr.create_checkpoint("inc", n, changed[n % 2]))

            def raw_put() -> None:
                n = next(counter)
                list(pool.map(lambda ip: obstore.put(raw, f"{n}/{ip[0]}", ip[1]), enumerate(pieces)))
                puts.append(n)

            def cfs_load() -> None:
                out = CheckpointManager(ObjectStore(url, **opts)).load_checkpoint(saved[-1])["state"]
                assert np.array_equal(out["w0"], state["w0"])

            def raw_get() -> None:
                n = puts[-1]
                got = list(pool.map(lambda i: obstore.get(raw, f"{n}/{i}").bytes(), range(len(pieces))))
                assert sum(len(g) for g in got) == blob.size

            def cleanup(i: int) -> None:
                if i == 0 and len(saved) > 1:
                    mgr.delete_checkpoint(saved.pop(0))
                if i == 1 and len(puts) > 1:
                    n = puts.pop(0)
                    obstore.delete(raw, [f"{n}/{j}" for j in range(len(pieces))])
                if i == 2 and len(inc) > 1:
                    mgr.delete_checkpoint(inc.pop(0))

            save_t = interleaved([cfs_save, raw_put, cfs_incremental], args.repeats, cleanup)
            load_t = interleaved([cfs_load, raw_get], args.repeats)
            for cid in saved + inc:  # moto keeps objects in memory: leave it as found
                mgr.delete_checkpoint(cid)
            obstore.delete(raw, [f"{n}/{j}" for n in puts for j in range(len(pieces))])
            return [
                ("cfs save", save_t[0], "raw PUT"),
                ("raw PUT", save_t[1], None),
                ("cfs incr.", save_t[2], "raw PUT"),
                ("cfs load", load_t[0], "raw GET"),
                ("raw GET", load_t[1], None),
            ]

        tables = [("loopback", throughput(None))]
        # every fresh manager opens connections of its own, and idle ones stay open a while: room for all
        with DroppingProxy(srv.port, delay=args.rtt_ms / 1000, max_conns=4096, lifetime=7200) as proxy:
            tables.append((f"through a proxy adding {args.rtt_ms:g} ms to every request", throughput(proxy.endpoint)))
        last = [""]
        with tempfile.TemporaryDirectory() as d:
            local = CheckpointManager(d)
            local_t = interleaved(
                [lambda: local.create_checkpoint("l", next(counter), state), lambda: local.load_checkpoint(last[0])],
                args.repeats,
                lambda i: last.__setitem__(0, local.list_checkpoints()[0].checkpoint_id) if i == 0 else None,
            )
            tables.append(("a local directory store (durable), for scale", [
                ("local save", local_t[0], None), ("local load", local_t[1], None)
            ]))  # fmt: skip

        # listing through a proxy that adds a network round trip to every request (moto on
        # loopback answers in ~1 ms, so on its own it cannot show what latency costs)
        list_url = f"s3://{bucket}/list"
        lister = CheckpointManager(list_url)
        for i in range(args.list_count):
            lister.create_checkpoint("l", i, {"x": np.arange(10.0)})
        with DroppingProxy(srv.port, delay=args.rtt_ms / 1000, max_conns=4096, lifetime=7200) as proxy:

            def list_with(sequential: bool):
                def run() -> None:
                    m = CheckpointManager(ObjectStore(list_url, endpoint=proxy.endpoint))
                    if sequential:
                        m.store.supports_rename = True  # the manager then reads one checkpoint at a time
                    assert len(m.list_checkpoints()) == args.list_count

                return run

            list_t = interleaved([list_with(False), list_with(True)], args.repeats)

    print(f"\nstate: {leaves} float32 leaves, {args.size_mib} MiB; medians of {args.repeats} after a warm-up")
    for title, rows in tables:
        med = {name: statistics.median(ts) for name, ts, _ in rows}
        print(f"\n{title}:")
        print(f"{'method':<12} {'median s':>9} {'MiB/s':>8} {'vs':>9} {'ratio':>6}  all runs (s)")
        for name, ts, ref in rows:
            ratio = f"{med[ref] / med[name]:.2f}x" if ref else ""
            print(
                f"{name:<12} {med[name]:9.3f} {args.size_mib / med[name]:8.0f} {ref or '':>9} {ratio:>6}  "
                + " ".join(f"{t:.3f}" for t in ts)
            )
    print("ratio = reference time / cfs time (1.00x: as fast as plain PUTs/GETs of the same bytes)")
    seq, par = statistics.median(list_t[1]), statistics.median(list_t[0])
    print(f"\nlisting {args.list_count} checkpoints (a fresh manager), {args.rtt_ms:g} ms added to every request:")
    print(f"  16 in flight      {par:7.3f} s   all runs: " + " ".join(f"{t:.3f}" for t in list_t[0]))
    print(f"  one at a time     {seq:7.3f} s   all runs: " + " ".join(f"{t:.3f}" for t in list_t[1]))
    print(f"  speed-up          {seq / par:7.1f}x")


if __name__ == "__main__":
    main()
