"""``cfs``: the command line.  Thin on purpose: it only calls the public API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

DEFAULT_ROOT = os.environ.get("CFS_ROOT", "checkpoints")


def _manager(args: argparse.Namespace):
    from . import CheckpointManager

    return CheckpointManager(args.root)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_list(args: argparse.Namespace) -> int:
    infos = _manager(args).list_checkpoints(args.run)
    if args.json:
        _print_json(
            [
                {
                    "checkpoint_id": i.checkpoint_id,
                    "run_id": i.run_id,
                    "iteration": i.iteration,
                    "created_at": i.created_at,
                    "path": i.path,
                    "lineage": i.lineage,
                    "telemetry_summary": i.telemetry_summary,
                }
                for i in infos
            ]
        )
        return 0
    if not infos:
        print(f"no checkpoints in {os.path.abspath(args.root)}")
        return 0
    print(f"{'checkpoint':<40} {'run':<20} {'iteration':>10}  {'final E':>12}  created (UTC)")
    for i in infos:
        e = i.telemetry_summary.get("final_energy")
        print(
            f"{i.checkpoint_id:<40} {i.run_id:<20} {i.iteration:>10}  {'' if e is None else f'{e:12.6g}':>12}  "
            f"{i.created_at}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    view = _manager(args).open_checkpoint(args.checkpoint_id)
    leaves: list[dict[str, Any]] = []

    def walk(x: Any, path: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif hasattr(x, "shape"):
            leaves.append(
                {
                    "leaf": path,
                    "shape": list(x.shape),
                    "dtype": str(x.dtype),
                    "chunks": list(x.chunk_shape),
                    "bytes": int(x.nbytes),
                }
            )
        else:
            leaves.append({"leaf": path, "value": x})

    walk(view.state, "state")
    info = {
        "checkpoint_id": view.checkpoint_id,
        "run_id": view.run_id,
        "iteration": view.iteration,
        "created_at": view.created_at,
        "path": view.path,
        "flow_config": view.flow_config,
        "certificates": view.certificates,
        "metadata": view.metadata,
        "lineage": view.lineage,
        "telemetry_summary": view.telemetry_summary,
        "leaves": leaves,
    }
    if args.json:
        _print_json(info)
        return 0
    for k in ("checkpoint_id", "run_id", "iteration", "created_at", "path"):
        print(f"{k:>18}: {info[k]}")
    for k in ("flow_config", "certificates", "metadata", "lineage", "telemetry_summary"):
        print(f"{k:>18}: {json.dumps(info[k])}")
    print("leaves:")
    for leaf in leaves:
        if "shape" in leaf:
            print(
                f"  {leaf['leaf']:<40} {leaf['dtype']:<10} {str(tuple(leaf['shape'])):<20} "
                f"chunks={tuple(leaf['chunks'])} {leaf['bytes']} B"
            )
        else:
            print(f"  {leaf['leaf']:<40} {leaf['value']!r}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    mgr = _manager(args)
    ids = args.checkpoint_ids or [i.checkpoint_id for i in mgr.list_checkpoints()]
    bad = 0
    for cid in ids:
        report = mgr.verify_checkpoint(cid)
        if args.json:
            _print_json({"checkpoint_id": cid, "ok": report.ok, "problems": report.problems})
        else:
            print(f"{cid}: {'OK' if report.ok else 'DAMAGED'}")
            for p in report.problems:
                print(f"  - {p}")
        bad += not report.ok
    return 1 if bad else 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    n = _manager(args).cleanup_old_checkpoints(args.run, keep_last=args.keep_last)
    print(f"deleted {n} checkpoint(s) of run {args.run!r}, kept the newest {args.keep_last}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Create, list, load and roll back checkpoints of a small gradient-descent flow."""
    import numpy as np

    mgr = _manager(args)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 32))
    y = a @ rng.standard_normal(32)
    x = np.zeros(32)
    step = 1.0 / np.linalg.norm(a, 2) ** 2
    hist: dict[str, list] = {"iter": [], "E": [], "grad_norm": [], "phase": []}
    import datetime as dt

    run_id = args.run or "demo-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    ids = []
    for it in range(1, args.iterations + 1):
        g = a.T @ (a @ x - y)
        x = x - step * g
        e = 0.5 * float(np.sum((a @ x - y) ** 2))
        for k, v in zip(hist, (it, e, float(np.linalg.norm(g)), "GREEN" if e < 1 else "AMBER")):
            hist[k].append(v)
        if it % args.interval == 0:
            state = {"x": x, "y": y, "A": a, "opt": {"step": np.float64(step), "iteration": np.int64(it)}}
            ids.append(
                mgr.create_checkpoint(
                    run_id,
                    it,
                    state,
                    {"kind": "least-squares", "step": step},
                    telemetry_history=hist,
                    certificates={"eta_dd": 0.0, "gamma": 0.0},
                )
            )
            print(f"saved {ids[-1]}  E={e:.6g}")
    print()
    cmd_list(argparse.Namespace(root=args.root, run=run_id, json=False))
    mid = ids[len(ids) // 2]
    loaded = mgr.load_checkpoint(mid)
    print(
        f"\nloaded {mid}: iteration {loaded['iteration']}, |x| = {np.linalg.norm(loaded['state']['x']):.6g}, "
        f"{len(loaded['telemetry']['E'])} telemetry samples"
    )
    branch = mgr.rollback_to_checkpoint(mid, f"{run_id}-branch")
    print(f"rolled back: {branch} (lineage {mgr.load_checkpoint(branch)['lineage']})")
    print(f"verify {ids[-1]}: {'OK' if mgr.verify_checkpoint(ids[-1]).ok else 'DAMAGED'}")
    print(f"\nopen with xarray: xarray.open_zarr({mgr.checkpoint_path(ids[-1])!r}, group='telemetry')")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cfs", description="Checkpoints for computable flows (Zarr v3).")
    p.add_argument(
        "--root", default=DEFAULT_ROOT, help="checkpoint store directory (default: $CFS_ROOT or ./checkpoints)"
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="list checkpoints, newest first")
    s.add_argument("--run", help="only this run")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("show", help="a checkpoint's attributes and leaves")
    s.add_argument("checkpoint_id")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)
    s = sub.add_parser("verify", help="read every chunk and report damage (all checkpoints if none named)")
    s.add_argument("checkpoint_ids", nargs="*")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_verify)
    s = sub.add_parser("cleanup", help="delete all but the newest checkpoints of a run")
    s.add_argument("run")
    s.add_argument("--keep-last", type=int, default=5)
    s.set_defaults(func=cmd_cleanup)
    s = sub.add_parser("demo", help="run a small flow that creates, lists, loads and rolls back checkpoints")
    s.add_argument("--run", default=None, help="run id (default: demo-<UTC timestamp>)")
    s.add_argument("--iterations", type=int, default=500)
    s.add_argument("--interval", type=int, default=100)
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CheckpointError as e:
        print(f"cfs: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
