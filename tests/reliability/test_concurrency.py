"""Scenario 6 (issue 5): four writer processes, two readers and a cleaner on one store.

- writers 0 and 1 save the same ids of run ``contested`` in lock step (each id at the
  same instant), so both usually pass the early existence check and race at the commit
  rename: exactly one must win each id, the other get CheckpointExistsError, and the
  committed checkpoint must be the winner's;
- writers 2 and 3 save alternate iterations of run ``mixed``; writer 3 also a run of its own;
- a cleaner keeps only the newest 3 of ``mixed`` (deleting while readers read) and opens
  new managers all the time (stale cleanup racing the writers' staging directories);
- readers load the newest and random checkpoints of every run, checking every value.

Targets: no partial reads (every load is exact, or CheckpointNotFoundError because the
cleaner deleted it meanwhile), no lost checkpoints (every saved id exists unless the
cleaner deleted it), exactly one winner per contested id, no writer error.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time

import pytest

from computable_flows_shim import CheckpointManager

from ._actors import state_for
from .conftest import HERE, add, staging_entries

ACTORS = os.path.join(HERE, "_actors.py")


def start(role: str, store: str, **params) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, ACTORS, role, store, json.dumps(params)], stdout=subprocess.PIPE, text=True, env=env
    )


def events(p: subprocess.Popen) -> list[dict]:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-2000:]
    return [json.loads(line) for line in out.splitlines()]


def run_scenario(tmp_path, contested: int, mixed: int, figures: dict) -> None:
    store = str(tmp_path / "store")
    stop = str(tmp_path / "stop")
    CheckpointManager(store)
    t0 = time.time() + 8.0  # after every process has imported the library
    same = [["contested", i] for i in range(contested)]
    writers = [
        start("writer", store, id=0, jobs=same, start=t0, slot=0.12),
        start("writer", store, id=1, jobs=same, start=t0, slot=0.12),
        start("writer", store, id=2, jobs=[["mixed", i] for i in range(0, 2 * mixed, 2)]),
        start("writer", store, id=3, jobs=[["mixed", i] for i in range(1, 2 * mixed, 2)] + [["solo", 0], ["solo", 1]]),
    ]
    others = [
        start("reader", store, id=10, stop=stop),
        start("reader", store, id=11, stop=stop),
        start("cleaner", store, run="mixed", keep=3, stop=stop),
    ]
    wev = [events(p) for p in writers]
    open(stop, "w").close()
    rev = [events(p) for p in others[:2]]
    cev = events(others[2])

    errors = [e for evs in wev + rev + [cev] for e in evs if e["event"] in ("error", "wrong")]
    assert not errors, errors[:3]
    saved = {(e["run"], e["iteration"]): w for w, evs in enumerate(wev) for e in evs if e["event"] == "won"}
    deleted = {e["id"] for e in cev if e["event"] == "deleted"}

    # exactly one winner per contested id; the loser was told CheckpointExistsError
    races = collections.Counter()
    for i in range(contested):
        outcomes = [next(e for e in wev[w] if e.get("iteration") == i) for w in (0, 1)]
        assert sorted(o["event"] for o in outcomes) == ["exists", "won"], outcomes
        races[next(o["at"] for o in outcomes if o["event"] == "exists")] += 1

    mgr = CheckpointManager(store)
    names = set(mgr.store.names())
    for (run, it), w in saved.items():
        cid = f"{run}-i{it:012d}"
        if cid in deleted:
            assert run == "mixed" and cid not in names
            continue
        assert cid in names, f"lost: {cid}"
        out = mgr.load_checkpoint(cid)
        assert out["metadata"]["writer"] == w, f"{cid}: committed by {out['metadata']['writer']}, winner was {w}"
        assert out["state"]["x"].tobytes() == state_for(run, it, w)["x"].tobytes()
    assert names == {f"{r}-i{i:012d}" for r, i in saved} - deleted, "a checkpoint appeared that nobody saved"
    assert sorted(n for n in names if n.startswith("mixed-")) == [
        f"mixed-i{i:012d}" for i in range(2 * mixed - 3, 2 * mixed)
    ]
    assert staging_entries(store) == []
    loads = collections.Counter(e["event"] for evs in rev for e in evs if e["event"] in ("ok", "deleted"))
    mid_read = sum(1 for evs in rev for e in evs if e["event"] == "deleted" and "while being read" in e["error"])
    assert loads["ok"] > 20
    fig = figures["6. concurrency (4 writers, 2 readers, 1 cleaner, one store)"]
    add(fig, "checkpoints committed", len(saved))
    add(fig, "contested ids (two writers at once): exactly one winner", contested)
    add(fig, "  losers refused at the commit rename (RENAME_NOREPLACE)", races["rename"])
    add(fig, "  losers refused by the early existence check", races["check"])
    add(fig, "checkpoints deleted by the cleaner meanwhile", len(deleted))
    add(fig, "reader loads checked bit-exact", loads["ok"])
    add(fig, "reader loads of a checkpoint deleted meanwhile: CheckpointNotFoundError", loads["deleted"])
    add(fig, "  of which deleted mid-load ('deleted while being read')", mid_read)
    fig["partial or wrong reads / lost checkpoints / writer errors"] = "0 / 0 / 0"


def test_four_writers_readers_and_a_cleaner(tmp_path, figures):
    run_scenario(tmp_path, contested=25, mixed=20, figures=figures)


@pytest.mark.slow
def test_four_writers_readers_and_a_cleaner_long(tmp_path, figures):
    run_scenario(tmp_path, contested=150, mixed=120, figures=figures)
