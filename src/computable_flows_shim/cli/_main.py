"""``cfs``: the command line.  Thin on purpose: it only calls the public API."""

from __future__ import annotations

import argparse
import json
import os
import sys

from computable_flows_shim import make_example, resume_flow, run_flow
from computable_flows_shim._format.spec import is_checkpoint_id
from computable_flows_shim.cli import _analysis as _cli_analysis
from computable_flows_shim.cli import _lifecycle as _cli_lifecycle
from computable_flows_shim.cli._common import add_store_option, open_manager, print_json, store_location
from computable_flows_shim.errors import CheckpointNotFoundError, ComputableFlowsError


def cmd_list(args: argparse.Namespace) -> int:
    infos = open_manager(args).list_checkpoints(args.run)
    if args.json:
        print_json(
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
        print(f"no checkpoints in {store_location(args.root)}")
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
    mgr = open_manager(args)
    view = mgr.open_checkpoint(args.checkpoint_id)
    layout = _cli_analysis.show_layout(mgr, view)  # leaves with chunk layout and bytes, on-disk size
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
        **layout,
    }
    if args.json:
        print_json(info)
        return 0
    for k in ("checkpoint_id", "run_id", "iteration", "created_at", "path"):
        print(f"{k:>18}: {info[k]}")
    for k in ("flow_config", "certificates", "metadata", "lineage", "telemetry_summary"):
        print(f"{k:>18}: {json.dumps(info[k])}")
    _cli_analysis.print_leaves(layout)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    mgr = open_manager(args)
    ids = args.checkpoint_ids or [i.checkpoint_id for i in mgr.list_checkpoints()]
    bad = 0
    with _cli_lifecycle.bar(args, 0, nbytes=True, desc="verifying") as progress:
        if not progress.disable:  # sizes only for the bar: one stat per file
            sizes = {c.checkpoint_id: c.bytes for c in mgr.disk_usage().checkpoints}
            progress.total = sum(sizes.get(cid, 0) for cid in ids)
        for cid in ids:
            try:
                report = mgr.verify_checkpoint(cid)
            except CheckpointNotFoundError:
                if args.checkpoint_ids:
                    raise
                progress.write(f"{cid}: deleted meanwhile, skipped", file=sys.stdout)
                continue
            if not progress.disable:
                progress.update(sizes.get(cid, 0))
            if args.json:
                print_json({"checkpoint_id": cid, "ok": report.ok, "problems": report.problems})
            else:  # tqdm's write keeps the bar below the lines
                progress.write(f"{cid}: {'OK' if report.ok else 'DAMAGED'}", file=sys.stdout)
                for p in report.problems:
                    progress.write(f"  - {p}", file=sys.stdout)
            bad += not report.ok
    return 1 if bad else 0


def _progress(args: argparse.Namespace, total: int, start: int):
    """A tqdm bar on a terminal; otherwise a log line at every checkpoint."""
    if sys.stderr.isatty() and not getattr(args, "quiet", False):
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, file=sys.stderr)

        def update(p: dict) -> None:
            bar.update(1)
            bar.set_postfix_str(f"E={p['E']:.6g} {p['phase']} ckpt={p['checkpoint'] or '-'}", refresh=False)
            if p["iter"] >= p["end"]:
                bar.close()

        return update
    last = [None]

    def log(p: dict) -> None:
        if p["checkpoint"] != last[0] and not getattr(args, "quiet", False):
            last[0] = p["checkpoint"]
            print(
                f"iter {p['iter']}/{p['end']}  E={p['E']:.6g}  {p['phase']}  checkpoint {p['checkpoint']}",
                file=sys.stderr,
                flush=True,
            )

    return log


def _report(args: argparse.Namespace, result) -> int:
    store = store_location(args.root)
    if result.status == "interrupted":
        import signal

        name = signal.Signals(result.signal).name if result.signal else "a signal"
        print(
            f"\ninterrupted by {name} at iteration {result.iteration}; saved checkpoint {result.last_checkpoint}.\n"
            f"resume with:  cfs --store {store} resume {result.last_checkpoint}",
            file=sys.stderr,
        )
        return 128 + (result.signal or 0)
    e = result.telemetry["E"]
    print(
        f"run {result.run_id}: {result.iteration} iterations, E {e[0]:.6g} -> {e[-1]:.6g}, "
        f"certificates {result.certificates['phase']} (eta_dd={result.certificates['eta_dd']:.3g}, "
        f"gamma={result.certificates['gamma']:.3g}), last checkpoint {result.last_checkpoint}"
    )
    last_path = os.path.join(store, str(result.last_checkpoint))
    if not getattr(args, "quiet", False):
        print(f"""
next, try:
  cfs --store {store} ls
  cfs --store {store} show {result.last_checkpoint}
  cfs --store {store} resume {result.run_id} --iters {result.iteration + 500}
  cfs --store {store} rollback {result.checkpoints[len(result.checkpoints) // 2]} --to-run {result.run_id}-branch
  python -c "import xarray as xr; print(xr.open_zarr('{last_path}', group='telemetry'))"
""")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec, y, default_iters = make_example(args.example, seed=args.seed)
    iters = args.iters if args.iters is not None else default_iters
    return _report(
        args,
        run_flow(
            spec,
            y,
            iters=iters,
            seed=args.seed,
            checkpoint_manager=open_manager(args, create=True),
            checkpoint_interval=args.checkpoint_every,
            run_id=args.run_id,
            telemetry_every=args.telemetry_every,
            progress=_progress(args, iters, 0),
        ),
    )


def cmd_resume(args: argparse.Namespace) -> int:
    mgr = open_manager(args)
    cid = args.target if is_checkpoint_id(args.target) else mgr.get_latest_checkpoint(args.target)
    if cid is None:
        print(f"cfs: error: no checkpoints of run {args.target!r} in {store_location(args.root)}", file=sys.stderr)
        return 2
    info = mgr.open_checkpoint(cid)
    end = args.iters if args.iters is not None else int(info.metadata.get("target_iters", info.iteration))
    if end < info.iteration:
        print(f"cfs: error: --iters {end} is before the checkpoint's iteration {info.iteration}", file=sys.stderr)
        return 2
    return _report(
        args, resume_flow(cid, mgr, remaining_iters=end - info.iteration, progress=_progress(args, end, info.iteration))
    )


def cmd_rollback(args: argparse.Namespace) -> int:
    new = open_manager(args).rollback_to_checkpoint(args.checkpoint_id, args.to_run)
    print(new)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    mgr = open_manager(args)
    missing = []
    with _cli_lifecycle.bar(args, len(args.checkpoint_ids), desc="deleting") as progress:
        for cid in args.checkpoint_ids:
            if not mgr.delete_checkpoint(cid):
                missing.append(cid)
            progress.update(1)
    for cid in missing:
        print(f"cfs: no checkpoint {cid!r}", file=sys.stderr)
    return 1 if missing else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cfs",
        description="Checkpoints for computable flows (Zarr v3).",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_store_option(p, top=True)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("run", help="run a built-in example flow with periodic checkpoints")
    s.add_argument("example", nargs="?", default="deblur2d", help="deblur2d (default) or deconv1d")
    s.add_argument("--run-id", default=None, help="default: run-<UTC time>-<random>")
    s.add_argument("--iters", type=int, default=None, help="default: the example's own count")
    s.add_argument("--checkpoint-every", type=int, default=100)
    s.add_argument("--telemetry-every", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("resume", help="continue a run from its latest (or the given) checkpoint")
    s.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    s.add_argument("--iters", type=int, default=None, help="total iterations to reach (default: the run's own)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_resume)
    s = sub.add_parser("rollback", help="branch a new run from a checkpoint")
    s.add_argument("checkpoint_id")
    s.add_argument("--to-run", required=True)
    s.set_defaults(func=cmd_rollback)
    s = sub.add_parser("rm", help="delete checkpoints")
    s.add_argument("checkpoint_ids", nargs="+")
    s.set_defaults(func=cmd_rm)
    s = sub.add_parser("ls", aliases=["list"], help="list checkpoints, newest first")
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
    _cli_lifecycle.add_commands(sub)  # gc, du, tag, tags
    _cli_analysis.add_commands(sub)  # diff, tree, plot, export
    for parser in {id(c): c for c in sub.choices.values()}.values():  # an alias shares its parser
        add_store_option(parser, top=False)
    return p


EXIT_CODES = """exit codes:
  0    done
  1    done, and something was found wrong (cfs verify: damage; cfs rm: no such checkpoint)
  2    an error: bad usage, no store, no such checkpoint, a failed save (one line on stderr)
  130  interrupted by Ctrl-C (cfs run and resume: after checkpointing; 143 for SIGTERM)
  141  the output was closed early (cfs ls | head): nothing more is printed
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ComputableFlowsError as e:
        print(f"cfs: error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (| head): stop quietly; stdout is pointed at /dev/null so that
        # the interpreter's own flush at exit does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
