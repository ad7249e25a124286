"""What the CLI's commands share: where the store is, and opening it."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from computable_flows_shim import CheckpointManager
from computable_flows_shim.errors import StoreUnavailableError

DEFAULT_STORE = os.environ.get("CFS_STORE", "runs")


def store_location(root: str) -> str:
    """A store as the CLI shows it: a URL as given, a directory made absolute."""
    return root if "://" in str(root) else os.path.abspath(root)


def open_manager(args: argparse.Namespace, create: bool = False) -> CheckpointManager:
    """The store of ``--store``.  Only ``cfs run`` creates a missing local store; every other
    command says there is none (a typo must not leave an empty directory behind)."""
    root = args.root
    if not create and "://" not in str(root) and not os.path.isdir(root):
        raise StoreUnavailableError(
            f"no checkpoint store at {store_location(root)} (cfs run creates one; --store or $CFS_STORE names another)"
        )
    return CheckpointManager(root)


def print_json(obj: Any) -> None:
    """A command's ``--json`` output."""
    print(json.dumps(obj, indent=2, default=str))


def add_store_option(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--store`` on ``cfs`` itself and on every subcommand (before or after it), the
    subcommand's value winning when both are given."""
    parser.add_argument(
        "--store",
        "--root",
        dest="root",
        default=DEFAULT_STORE if top else argparse.SUPPRESS,
        help="checkpoint store: a directory or s3://bucket/prefix (default: $CFS_STORE or ./runs)",
    )


__all__ = ["DEFAULT_STORE", "store_location", "open_manager", "add_store_option", "print_json"]
