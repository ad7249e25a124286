"""Import Orbax checkpoints: a directory of Orbax checkpoints becomes a run of ours, bit for bit.

Orbax writes a pytree as an *item* directory (``_METADATA``, ``manifest.ocdbt``, ...); a
``CheckpointManager`` writes one *step* directory per step (``<step>/``), holding one item
directory per item (``default/`` for a single one).  :func:`import_orbax` takes any of the
three: an item directory, a step directory or a manager directory, restores each step with
Orbax itself (``StandardCheckpointer.restore``, no target: every leaf as saved, dtype and
shape), and saves it as a checkpoint of ``run_id`` at that step (an item alone, or a dict of
items by name when a step has several).  Needs the ``orbax`` extra.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from computable_flows_shim._types import CheckpointId, RunId
from computable_flows_shim.checkpoints._manager import CheckpointManager
from computable_flows_shim.errors import CheckpointFormatError, MissingDependencyError

ITEM_MARKER = "_METADATA"
"""The file Orbax's pytree handler writes into every item directory."""


def _is_item(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ITEM_MARKER))


def _items(step_dir: str) -> dict[str, str]:
    """The item directories of a step directory, by name."""
    return {
        e.name: e.path
        for e in sorted(os.scandir(step_dir), key=lambda e: e.name)
        if e.is_dir(follow_symlinks=False) and _is_item(e.path)
    }


def find_steps(src: str, step: int | None = None) -> list[tuple[int, dict[str, str]]]:
    """``(step, {item name: item directory})`` for every step under ``src`` (see the module
    docstring), in step order; CheckpointFormatError if ``src`` holds no Orbax checkpoint."""
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise CheckpointFormatError(f"{src}: not a directory")
    name = os.path.basename(src)
    numbered = int(name) if name.isdigit() else None
    if _is_item(src):  # one pytree
        return [(step if step is not None else numbered or 0, {"": src})]
    items = _items(src)
    if items:  # one step of a CheckpointManager
        return [(step if step is not None else numbered or 0, items)]
    steps = []
    for e in sorted(os.scandir(src), key=lambda e: (len(e.name), e.name)):
        if e.is_dir(follow_symlinks=False) and e.name.isdigit() and (found := _items(e.path)):
            steps.append((int(e.name), found))
    if step is not None:
        steps = [s for s in steps if s[0] == step]
    if not steps:
        raise CheckpointFormatError(
            f"{src}: no Orbax checkpoint here (an item directory holds {ITEM_MARKER}; a step directory, item "
            "directories; a CheckpointManager directory, numbered step directories)"
            + (f" with step {step}" if step is not None else "")
        )
    return steps


def import_orbax(
    mgr: CheckpointManager,
    src: str | os.PathLike,
    run_id: RunId,
    *,
    step: int | None = None,
    progress: Callable[[int, int, CheckpointId], None] | None = None,
) -> list[CheckpointId]:
    """Import the Orbax checkpoint(s) at ``src`` as checkpoints of ``run_id``; returns their ids.

    ``step``: import only that step of a manager directory (or the step number to give a
    lone item or step directory, default its directory name when numeric, else 0).
    ``progress(done, total, id)`` is called after each import.

    Example::

        >>> import_orbax(mgr, "orbax_ckpts/", "imported")      # a CheckpointManager directory
        ['imported-i000000000010', 'imported-i000000000020']
    """
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise MissingDependencyError(
            "importing Orbax checkpoints needs orbax-checkpoint: pip install 'computable-flows-shim[orbax]'"
        ) from e
    steps = find_steps(os.fspath(src), step)
    checkpointer = ocp.StandardCheckpointer()
    out: list[CheckpointId] = []
    for n, (it, items) in enumerate(steps, start=1):
        trees: dict[str, Any] = {name: checkpointer.restore(path) for name, path in items.items()}
        state = trees[""] if "" in trees else trees["default"] if list(trees) == ["default"] else trees
        first = next(iter(items.values()))
        source = {"format": "orbax", "path": first if len(items) == 1 else os.path.dirname(first)}
        out.append(mgr.create_checkpoint(run_id, it, state, metadata={"imported_from": source}))
        if progress is not None:
            progress(n, len(steps), out[-1])
    return out


__all__ = ["import_orbax", "find_steps"]
