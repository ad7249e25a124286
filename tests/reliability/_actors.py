"""Processes for the concurrency test: writers, readers and a cleaner on one store.

Usage: ``python _actors.py ROLE STORE JSON`` (JSON: the role's parameters).  Each prints
one JSON object per line: what it did, so the test can check it afterwards.

- ``writer``: saves ``jobs`` (``[run, iteration]`` pairs), each at ``start + slot * k``
  when ``slot`` is given (two writers with the same jobs then race for the same ids);
  reports ``won`` / ``exists`` (CheckpointExistsError) / ``error`` per job.
- ``reader``: until the file ``stop`` exists, lists the store and loads the latest and a
  random checkpoint of each run, checking every value against :func:`state_for`;
  reports each load as ``ok``, ``deleted`` (CheckpointNotFoundError: a cleanup removed it
  while it was read) or ``error``.
- ``cleaner``: until ``stop``, opens a new manager (stale cleanup runs) and applies
  ``KeepLatest(keep)`` to ``run``; reports every checkpoint it deleted.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
import warnings
import zlib

import numpy as np


def state_for(run: str, iteration: int, writer: int) -> dict:
    """The state writer ``writer`` saves for (run, iteration): readers recompute it."""
    seed = zlib.crc32(f"{run}/{iteration}/{writer}".encode())
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal(200_000), "tag": np.int64(seed), "w": {"writer": writer}}


def emit(**kw) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def writer(mgr, p: dict) -> None:
    from computable_flows_shim import CheckpointExistsError

    for k, (run, it) in enumerate(p["jobs"]):
        if p.get("slot"):
            time.sleep(max(0.0, p["start"] + p["slot"] * k - time.time()))
        try:
            mgr.create_checkpoint(run, it, state_for(run, it, p["id"]), metadata={"writer": p["id"]})
            emit(event="won", run=run, iteration=it)
        except CheckpointExistsError as e:
            # 'LocalDirectoryStore(' is the early check; otherwise the commit's RENAME_NOREPLACE said no
            emit(event="exists", run=run, iteration=it, at="check" if "LocalDirectoryStore(" in str(e) else "rename")
        except Exception as e:  # noqa: BLE001 - reported; the test fails on it
            emit(event="error", run=run, iteration=it, error=repr(e), tb=traceback.format_exc())


def reader(mgr, p: dict) -> None:
    from computable_flows_shim import CheckpointNotFoundError

    rng = random.Random(p["id"])
    while not os.path.exists(p["stop"]):
        infos = mgr.list_checkpoints()
        by_run: dict[str, list] = {}
        for i in infos:
            by_run.setdefault(i.run_id, []).append(i)
        picks = [max(v, key=lambda i: i.iteration) for v in by_run.values()]
        picks += [rng.choice(infos)] if infos else []
        for info in picks:
            try:
                out = mgr.load_checkpoint(info.checkpoint_id)
            except CheckpointNotFoundError as e:
                emit(event="deleted", id=info.checkpoint_id, error=str(e)[:200])
                continue
            except Exception as e:  # noqa: BLE001
                emit(event="error", id=info.checkpoint_id, error=repr(e), tb=traceback.format_exc())
                continue
            w = out["metadata"]["writer"]
            want = state_for(info.run_id, info.iteration, w)
            ok = (
                out["state"]["x"].tobytes() == want["x"].tobytes()
                and int(out["state"]["tag"]) == int(want["tag"])
                and out["state"]["w"] == want["w"]
            )
            emit(event="ok" if ok else "wrong", id=info.checkpoint_id, writer=w)
        time.sleep(0.005)


def cleaner(mgr_factory, p: dict) -> None:
    from computable_flows_shim import KeepLatest

    while not os.path.exists(p["stop"]):
        mgr = mgr_factory()  # a new manager runs stale cleanup, racing the writers' staging
        try:
            for cid in mgr.apply_retention(p["run"], KeepLatest(p["keep"])).deleted:
                emit(event="deleted", id=cid)
        except Exception as e:  # noqa: BLE001
            emit(event="error", error=repr(e), tb=traceback.format_exc())
        time.sleep(0.02)


def main() -> None:
    role, store, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    warnings.simplefilter("error")  # a damaged checkpoint skipped while listing is a failure here
    from computable_flows_shim import CheckpointManager

    emit(event="ready")
    if role == "writer":
        writer(CheckpointManager(store), params)
    elif role == "reader":
        reader(CheckpointManager(store), params)
    elif role == "cleaner":
        cleaner(lambda: CheckpointManager(store), params)
    emit(event="done")


if __name__ == "__main__":
    main()
