"""Compressed checkpoints: stored bytes, save and load time of each codec against uncompressed,
all measured in the same run (medians after a warm-up; ratios to "none" in the same table).

    python benchmarks/bench_compression.py                  # ~2-4 minutes on 2 cores
    python benchmarks/bench_compression.py --scale 1.0      # GPT-2 small at full size (1.16 GiB)
    python benchmarks/bench_compression.py --smoke          # tiny sizes, 1 run: what CI runs

States:
  flow    the final state of the default flow (`cfs run`: deblur2d, --flow-iters iterations, run
          here without checkpoints): x (the restored 256x256 float32 image), y (the blurred, noisy
          observation), the PRNG key's data and the step size; with its telemetry (never compressed)
  model   GPT-2 small's training state (benchmarks/bench_models.py: bfloat16 params, float32 Adam mu
          and nu, two counts), big dimensions times --scale; random values of realistic magnitudes,
          so the only redundancy is in the exponents (real moments compress at least as well)
  normal  --random-mib MiB of standard normal float32 (random mantissas, narrow exponents)
  bits    --random-mib MiB of uniformly random uint32: nothing to find (the switch-off rule's case)

Codecs (CheckpointManager(compression=...); every array whose first chunk does not shrink by 10 %
is written uncompressed, the "compressed" column counts those that were not):
  none          the default: bytes + crc32c
  zstd-1/3/9    zstd at that level
  blosc-zstd    blosc, inner zstd level 5, byte shuffle (Compression("blosc"))
  blosc-lz4     blosc, inner lz4 level 5, byte shuffle

Saves: CheckpointManager(durable=False) (no fsync: the codec's cost, not the disk's), a fresh run
id each time (no incremental links), the page cache synced (untimed) before each; loads:
load_checkpoint (numpy arrays, every chunk CRC-checked, from the page cache).  "stored MiB" is the
sum of the checkpoint's file sizes (what an object store bills); "x none" columns are this codec's
median over the median of "none" (stored bytes: ratio; time: > 1 is slower).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

from computable_flows_shim import CheckpointManager, Compression

MiB = 1 << 20
CODECS: dict[str, Any] = {
    "none": None,
    "zstd-1": Compression("zstd", level=1),
    "zstd-3": Compression("zstd", level=3),
    "zstd-9": Compression("zstd", level=9),
    "blosc-zstd": Compression("blosc", cname="zstd", level=5),
    "blosc-lz4": Compression("blosc", cname="lz4", level=5),
}


def flow_state(iters: int) -> tuple[dict, dict]:
    """The final state and telemetry of the default flow after ``iters`` iterations."""
    from computable_flows_shim import make_example, run_flow

    spec, y, _ = make_example()
    res = run_flow(spec, y, iters=iters)
    return res.state, res.telemetry


def model_state(scale: float) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_models import gpt2_small

    return gpt2_small(scale=scale)


def random_states(mib: float) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    n = int(mib * MiB) // 4
    return {
        "normal": {"w": rng.standard_normal(n, dtype=np.float32)},
        "bits": {"w": rng.integers(0, 1 << 32, n, dtype=np.uint32)},
    }


def raw(a: Any) -> np.ndarray:
    """A leaf's bytes as numpy (a typed PRNG key: its key data)."""
    import jax

    if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        a = jax.random.key_data(a)
    return np.asarray(a)


def nbytes(tree: Any) -> int:
    import jax

    return sum(raw(a).nbytes for a in jax.tree_util.tree_leaves(tree) if hasattr(a, "shape"))


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(b, f)) for b, _, files in os.walk(path) for f in files)


def codecs_used(path: str) -> tuple[int, int]:
    """(compressed arrays, arrays) under state/."""
    import json

    n = m = 0
    for base, _, files in os.walk(os.path.join(path, "state")):
        if "zarr.json" in files:
            with open(os.path.join(base, "zarr.json")) as f:
                doc = json.load(f)
            if doc.get("node_type") == "array":
                m += 1
                n += len(doc["codecs"]) == 3
    return n, m


def syncfs_untimed(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if hasattr(os, "sync"):
            os.sync()
    finally:
        os.close(fd)


def measure(name: str, state: dict, telemetry: Any, work: str, repeats: int) -> list[dict]:
    """Every codec on one state, interleaved: round 0 (the warm-up) runs each once."""
    mgr = CheckpointManager(os.path.join(work, name), durable=False)
    times: dict[str, dict[str, list[float]]] = {c: {"save": [], "load": []} for c in CODECS}
    stored: dict[str, int] = {}
    used: dict[str, tuple[int, int]] = {}
    for rnd in range(repeats + 1):
        for codec, comp in CODECS.items():
            run = f"{name}-{codec}-{rnd}"
            syncfs_untimed(work)
            t = time.perf_counter()
            cid = mgr.create_checkpoint(run, 1, state, telemetry_history=telemetry, compression=comp)
            t_save = time.perf_counter() - t
            t = time.perf_counter()
            out = mgr.load_checkpoint(cid)
            t_load = time.perf_counter() - t
            path = mgr.checkpoint_path(cid)
            if rnd == 0:  # the warm-up: checked once, bit for bit
                import jax

                for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(out["state"])):
                    assert raw(a).tobytes() == raw(b).tobytes(), (name, codec)
                stored[codec] = tree_bytes(path)
                used[codec] = codecs_used(path)
            else:
                times[codec]["save"].append(t_save)
                times[codec]["load"].append(t_load)
            del out
            mgr.delete_checkpoint(cid)
    base = {k: statistics.median(times["none"][k]) for k in ("save", "load")}
    rows = []
    for codec in CODECS:
        save, load = (statistics.median(times[codec][k]) for k in ("save", "load"))
        rows.append(
            {
                "state": name,
                "raw": nbytes(state),
                "codec": codec,
                "stored": stored[codec],
                "ratio": stored[codec] / stored["none"],
                "save": save,
                "save_x": save / base["save"],
                "load": load,
                "load_x": load / base["load"],
                "used": used[codec],
                "runs": times[codec],
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--states", default="flow,model,normal,bits")
    ap.add_argument("--scale", type=float, default=0.35, help="GPT-2 small's big dims times this")
    ap.add_argument("--random-mib", type=float, default=64)
    ap.add_argument("--flow-iters", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one timed run")
    ap.add_argument("--verbose", action="store_true", help="print every run")
    args = ap.parse_args()
    if args.smoke:
        args.scale, args.random_mib, args.flow_iters, args.repeats = 0.02, 1, 20, 1
    wanted = args.states.split(",")
    work = tempfile.mkdtemp(prefix="cfs-bench-compression-", dir=os.getcwd())
    rows: list[dict] = []
    try:
        if "flow" in wanted:
            state, tel = flow_state(args.flow_iters)
            rows += measure("flow", state, tel, work, args.repeats)
        if "model" in wanted:
            rows += measure("model", model_state(args.scale), None, work, args.repeats)
        for name, st in random_states(args.random_mib).items():
            if name in wanted:
                rows += measure(name, st, None, work, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedians of {args.repeats} runs after a warm-up; durable=False; {os.cpu_count()} CPUs")
    for name in dict.fromkeys(r["state"] for r in rows):
        print(f"  {name}: {next(r['raw'] for r in rows if r['state'] == name) / MiB:.2f} MiB of array data")
    head = (
        f"{'state':<7} {'codec':<11} {'stored MiB':>10} {'x none':>7} {'save s':>8} {'x none':>7} "
        f"{'load s':>8} {'x none':>7} {'compressed':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        n, m = r["used"]
        print(
            f"{r['state']:<7} {r['codec']:<11} {r['stored'] / MiB:>10.2f} {r['ratio']:>7.3f} {r['save']:>8.3f} "
            f"{r['save_x']:>7.2f} {r['load']:>8.3f} {r['load_x']:>7.2f} {f'{n}/{m}':>10}"
        )
        if args.verbose:
            print(f"{'':<20} save runs {r['runs']['save']}  load runs {r['runs']['load']}")


if __name__ == "__main__":
    main()
