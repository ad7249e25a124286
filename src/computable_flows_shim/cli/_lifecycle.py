"""``cfs gc``, ``cfs du``, ``cfs tag``, ``cfs tags`` and the progress bars of long commands.

Thin like the rest of the CLI: the decisions (retention plans, disk usage) are made by
the public API; this module parses options and prints tables.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from computable_flows_shim import (
    KeepBest,
    KeepEvery,
    KeepLatest,
    KeepPerInterval,
    KeepTagged,
    any_of,
    import_orbax,
)
from computable_flows_shim._display import human_bytes
from computable_flows_shim.cli._common import open_manager, print_json, store_location


def bar(args: argparse.Namespace, total: int, *, unit: str = "checkpoint", nbytes: bool = False, desc: str = ""):
    """A tqdm progress bar on stderr, shown only on a terminal, never in ``--json`` mode, and
    only once the operation has run for more than half a second."""
    from tqdm import tqdm

    extra: dict[str, Any] = {"unit": "B", "unit_scale": True, "unit_divisor": 1024} if nbytes else {"unit": unit}
    return tqdm(
        total=total,
        desc=desc or None,
        file=sys.stderr,
        disable=bool(getattr(args, "json", False)) or not sys.stderr.isatty(),
        delay=0.5,
        dynamic_ncols=True,
        leave=False,
        **extra,
    )


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return x


def _keep_best(text: str):
    """``METRIC[:min|max][:K]``, e.g. ``E:min:3`` or ``gamma:max``."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise argparse.ArgumentTypeError(f"expected METRIC[:min|max][:K], got {text!r}")
    mode = parts[1] if len(parts) > 1 else "min"
    if mode not in ("min", "max"):
        raise argparse.ArgumentTypeError(f"{text!r}: mode must be 'min' or 'max', got {mode!r}")
    k = _positive_int(parts[2]) if len(parts) > 2 else 1
    return KeepBest(parts[0], k, mode)  # type: ignore[arg-type]


def add_policy_options(s: argparse.ArgumentParser) -> None:
    g = s.add_argument_group("retention policy (a checkpoint is kept when any option keeps it)")
    g.add_argument("--keep-last", type=_positive_int, metavar="N", help="the N highest iterations")
    g.add_argument("--keep-every", type=_positive_int, metavar="K", help="iterations that are multiples of K")
    g.add_argument(
        "--keep-best",
        type=_keep_best,
        action="append",
        default=[],
        metavar="METRIC[:min|max][:K]",
        help="the K best by a telemetry_summary or certificates value (E = final_energy), e.g. E:min:3",
    )
    g.add_argument("--keep-interval", type=_positive_float, metavar="SECONDS", help="the first per SECONDS of time")
    g.add_argument(
        "--keep-tagged", action="append", default=[], metavar="TAG", help="this tag (tagged ones are kept anyway)"
    )


def policy_from(args: argparse.Namespace):
    """The ``any_of`` of the policy options given, or None."""
    ps: list[Any] = []
    if args.keep_last is not None:
        ps.append(KeepLatest(args.keep_last))
    if args.keep_every is not None:
        ps.append(KeepEvery(args.keep_every))
    ps.extend(args.keep_best)
    if args.keep_interval is not None:
        ps.append(KeepPerInterval(args.keep_interval))
    if args.keep_tagged:
        ps.append(KeepTagged(*args.keep_tagged))
    return any_of(*ps) if ps else None


def _decision_table(report) -> None:
    print(f"{'checkpoint':<40} {'iteration':>10}  {'action':<7} reasons")
    for d in report.decisions:
        print(f"{d.checkpoint_id:<40} {d.iteration:>10}  {d.action:<7} {'; '.join(d.reasons) or '-'}")


def cmd_gc(args: argparse.Namespace) -> int:
    policy = policy_from(args)
    if policy is None:
        print("cfs gc: error: give at least one --keep-* option (see cfs gc --help)", file=sys.stderr)
        return 2
    mgr = open_manager(args)
    usage = mgr.disk_usage(args.run)  # before deleting: what the deleted checkpoints held
    with bar(args, 0, desc="deleting") as b:

        def progress(done: int, total: int, cid: str) -> None:
            b.total = total
            b.update(1)

        report = mgr.apply_retention(args.run, policy, dry_run=args.dry_run, force=args.force, progress=progress)
    freed = usage.freed_by(report.deleted)
    if args.json:
        print_json({**report.to_dict(), "freed_bytes": freed})
        return 0
    mode = "dry run, nothing deleted" if args.dry_run else "done"
    print(f"run {args.run!r}: {report.policy}{', force' if args.force else ''} ({mode})")
    _decision_table(report)
    verb = "would delete" if args.dry_run else "deleted"
    print(
        f"{verb} {len(report.deleted)} of {len(report.decisions)} checkpoint(s), "
        f"{'freeing' if args.dry_run else 'freed'} {human_bytes(freed)}"
    )
    return 0


def cmd_du(args: argparse.Namespace) -> int:
    mgr = open_manager(args)
    policy = policy_from(args)
    if policy is not None and args.run is None:
        print("cfs du: error: --keep-* options need a RUN", file=sys.stderr)
        return 2
    usage = mgr.disk_usage(args.run)
    report = mgr.apply_retention(args.run, policy, dry_run=True) if policy is not None else None
    out = usage.to_dict()
    if report is not None:
        out["gc"] = {
            "policy": report.policy,
            "would_delete": report.deleted,
            "would_free_bytes": usage.freed_by(report.deleted),
        }
    if args.json:
        print_json(out)
        return 0
    print(
        f"{store_location(args.root)}: {len(usage.checkpoints)} checkpoint(s) in {len(usage.runs)} run(s), "
        f"{human_bytes(usage.total_bytes)} (hard-linked files counted once)"
    )
    print(f"{'run':<32} {'checkpoints':>11} {'bytes':>11} {'exclusive':>11} {'shared':>11}")
    for r in usage.runs:
        print(
            f"{r.run_id:<32} {r.checkpoints:>11} {human_bytes(r.bytes):>11} {human_bytes(r.exclusive_bytes):>11} "
            f"{human_bytes(r.shared_bytes):>11}"
        )
    if args.run is not None:
        print(f"\n{'checkpoint':<40} {'files':>6} {'bytes':>11} {'exclusive':>11} {'shared':>11}")
        for c in usage.checkpoints:
            print(
                f"{c.checkpoint_id:<40} {c.files:>6} {human_bytes(c.bytes):>11} {human_bytes(c.exclusive_bytes):>11} "
                f"{human_bytes(c.shared_bytes):>11}"
            )
    if report is not None:
        print(
            f"\ngc with {report.policy} would delete {len(report.deleted)} checkpoint(s) "
            f"and free {human_bytes(out['gc']['would_free_bytes'])}"
        )
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    mgr = open_manager(args)
    for tag in args.tags:
        if args.remove:
            if not mgr.untag_checkpoint(args.checkpoint_id, tag):
                print(f"cfs: {args.checkpoint_id} has no tag {tag!r}", file=sys.stderr)
        else:
            mgr.tag_checkpoint(args.checkpoint_id, tag)
    print(f"{args.checkpoint_id}: {', '.join(mgr.tags(args.checkpoint_id)) or '(no tags)'}")
    return 0


def cmd_tags(args: argparse.Namespace) -> int:
    tagged = open_manager(args).tagged(args.tag, args.run)
    if args.json:
        print_json(tagged)
        return 0
    for cid, tags in tagged.items():
        print(f"{cid:<40} {', '.join(tags)}")
    return 0


def cmd_import_orbax(args: argparse.Namespace) -> int:
    mgr = open_manager(args, create=True)
    with bar(args, 0, desc="importing") as progress:

        def step_done(done: int, total: int, cid: str) -> None:
            progress.total = total
            progress.update(1)

        ids = import_orbax(mgr, args.src, args.run_id, step=args.step, progress=step_done)
    for cid in ids:
        print(cid)
    return 0


def add_commands(sub: Any) -> None:
    """Register the lifecycle subcommands on ``cfs``'s subparsers."""
    s = sub.add_parser(
        "gc",
        help="apply a retention policy to a run (--dry-run first to see what and why)",
        description="Delete the checkpoints of RUN that no --keep-* option keeps. The newest checkpoint, tagged "
        "checkpoints and branch points of other runs (unless --force) are always kept. Prints every decision "
        "with its reasons.",
    )
    s.add_argument("run")
    add_policy_options(s)
    s.add_argument("--dry-run", action="store_true", help="only report what would be deleted and why")
    s.add_argument("--force", action="store_true", help="also delete checkpoints other runs were branched from")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_gc)
    s = sub.add_parser("du", help="disk usage per run (and per checkpoint of RUN), hard links counted once")
    s.add_argument("run", nargs="?")
    add_policy_options(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_du)
    s = sub.add_parser("tag", help="tag a checkpoint (tagged checkpoints are never deleted by gc)")
    s.add_argument("checkpoint_id")
    s.add_argument("tags", nargs="+", metavar="TAG")
    s.add_argument("--remove", action="store_true", help="remove these tags instead")
    s.set_defaults(func=cmd_tag)
    s = sub.add_parser(
        "import-orbax",
        help="import Orbax checkpoints (an item, a step or a CheckpointManager directory) as a run",
        description="Restore each step with Orbax itself and save it, bit for bit, as a checkpoint of RUN_ID at "
        "that step (needs the orbax extra).",
    )
    s.add_argument("src", metavar="SRC")
    s.add_argument("--run-id", required=True)
    s.add_argument("--step", type=int, default=None, help="only this step (or the step of a lone item)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_import_orbax)
    s = sub.add_parser("tags", help="list tagged checkpoints")
    s.add_argument("--tag", help="only this tag")
    s.add_argument("--run", help="only this run")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tags)
