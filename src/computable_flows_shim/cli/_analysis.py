"""``cfs diff``, ``cfs tree``, ``cfs plot``, ``cfs export`` and the leaf table of ``cfs show``.

Thin like the rest of the CLI: each command calls one public function
(:func:`diff_checkpoints`, :func:`list_runs`, :func:`plot_telemetry` or with ``--state``
:func:`plot_states`, :func:`export_checkpoint`, :func:`describe_leaves`) and prints its result.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from computable_flows_shim import (
    describe_leaves,
    diff_checkpoints,
    export_checkpoint,
    format_run_tree,
    list_runs,
    plot_states,
    plot_telemetry,
)
from computable_flows_shim._display import human_bytes
from computable_flows_shim.cli._common import open_manager, store_location
from computable_flows_shim.errors import ComputableFlowsError


def show_layout(mgr: Any, view: Any) -> dict[str, Any]:
    """What ``cfs show`` adds: every leaf with its chunk layout and bytes, and the
    checkpoint's on-disk size (hard-linked files shared with other checkpoints apart)."""
    usage = next(
        (c for c in mgr.disk_usage(view.run_id).checkpoints if c.checkpoint_id == view.checkpoint_id),
        None,
    )
    return {
        "leaves": [leaf.to_dict() for leaf in describe_leaves(view)],
        "disk": usage.to_dict() if usage is not None else None,
    }


def print_leaves(layout: dict[str, Any]) -> None:
    disk = layout["disk"]
    if disk is not None:
        print(
            f"{'on disk':>18}: {human_bytes(disk['bytes'])} in {disk['files']} files "
            f"({human_bytes(disk['exclusive_bytes'])} exclusive, {human_bytes(disk['shared_bytes'])} hard-linked with "
            "other checkpoints)"
        )
    rows = []
    for leaf in layout["leaves"]:
        if leaf["kind"] == "scalar":
            rows.append((leaf["leaf"], type(leaf["value"]).__name__, repr(leaf["value"]), "", "", "", ""))
            continue
        dtype = leaf["dtype"] + (f" key:{leaf['key_impl']}" if leaf.get("key_impl") else "")
        grid = "x".join(map(str, leaf["grid"])) or "1"
        rows.append(
            (
                leaf["leaf"],
                dtype,
                str(tuple(leaf["shape"])),
                leaf["path"] if leaf.get("packed") else str(tuple(leaf["chunks"])),  # a pack's range
                f"{grid} = {leaf['nchunks']}",
                human_bytes(leaf["bytes"]),
                human_bytes(leaf["disk_bytes"]),
            )
        )
    headers = ("leaf", "dtype", "shape", "chunks", "grid", "bytes", "on disk")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    print("leaves:")
    for row in [headers, *rows]:
        print("  " + "  ".join(c.rjust(w) if i >= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


def cmd_diff(args: argparse.Namespace) -> int:
    d = diff_checkpoints(open_manager(args), args.a, args.b)
    if args.json:
        print(json.dumps(d.to_dict(), indent=2, default=str, allow_nan=False))
    else:
        print(d.format())
    return 0 if d.identical else 1  # like diff(1): 1 when the states differ


def cmd_tree(args: argparse.Namespace) -> int:
    runs = list_runs(open_manager(args))
    if args.json:
        print(json.dumps([r.to_dict() for r in runs], indent=2, default=str))
    elif not runs:
        print(f"no checkpoints in {store_location(args.root)}")
    else:
        print(format_run_tree(runs))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    try:
        if args.state is None:
            columns = args.columns or ["E", "grad_norm", "phase"]
            plot_telemetry(open_manager(args), args.runs or None, columns, path=args.output, title=args.title)
        else:
            runs = args.runs[0] if len(args.runs) == 1 else (args.runs or None)  # one run: no run axis
            reference = int(args.reference) if args.reference.lstrip("-").isdigit() else args.reference
            plot_states(
                open_manager(args),
                runs,
                args.state,
                iterations=args.iterations,
                count=args.count,
                reference=reference,
                norm=args.norm,
                columns=args.columns,
                path=args.output,
                title=args.title,
            )
    except (ValueError, KeyError, TypeError) as e:  # no such column, leaf or iteration; a text leaf
        print(f"cfs: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    print(args.output)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    print(export_checkpoint(open_manager(args), args.checkpoint_id, args.output, overwrite=args.force))
    return 0


def _guarded(func):
    """Report our errors (a missing optional package, a bad export target) as ``cfs: error``."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ComputableFlowsError as e:
            print(f"cfs: error: {e}", file=sys.stderr)
            return 2

    return run


def add_commands(sub: Any) -> None:
    s = sub.add_parser("diff", help="compare two checkpoints leaf by leaf (exit 1 if the states differ)")
    s.add_argument("a", metavar="A")
    s.add_argument("b", metavar="B")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_guarded(cmd_diff))
    s = sub.add_parser("tree", help="runs and their rollback lineage as a tree")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_guarded(cmd_tree))
    s = sub.add_parser(
        "plot",
        help="plot telemetry curves (energy, gradient norm, phase) of runs, or with --state a leaf over checkpoints",
    )
    s.add_argument("runs", nargs="*", metavar="RUN", help="run or checkpoint ids (default: every run)")
    s.add_argument("-o", "--output", required=True, help="image file: .png, .svg, .pdf")
    s.add_argument(
        "--columns", nargs="+", default=None, help="telemetry columns (default: E grad_norm phase; with --state: E)"
    )
    s.add_argument("--title", default=None)
    s.add_argument(
        "--state",
        metavar="LEAF",
        default=None,
        help="a state leaf (its stored path, e.g. x): a grid of a 2-D leaf at chosen checkpoints, and its "
        "distance to the last checkpoint and change from the previous one (RUNs are run ids)",
    )
    s.add_argument("--iterations", nargs="+", type=int, default=None, help="with --state: the checkpoints to show")
    s.add_argument("--count", type=int, default=6, help="with --state: how many evenly spaced checkpoints (default 6)")
    s.add_argument("--reference", default="last", help="with --state: distance to 'last' (default), 'first' or ITER")
    s.add_argument("--norm", choices=["l2", "l1", "linf", "rms"], default="l2", help="with --state (default l2)")
    s.set_defaults(func=_guarded(cmd_plot))
    s = sub.add_parser("export", help="write a checkpoint as HDF5 (.h5) or NumPy (.npz)")
    s.add_argument("checkpoint_id")
    s.add_argument("output", help="out.h5, out.hdf5 or out.npz")
    s.add_argument("--force", action="store_true", help="replace an existing output file")
    s.set_defaults(func=_guarded(cmd_export))


__all__ = ["add_commands", "show_layout", "print_leaves"]
