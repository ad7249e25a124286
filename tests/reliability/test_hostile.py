"""Scenario 7 (issue 5): hostile checkpoints (see ``_hostile.py`` for the corpus).

Every crafted checkpoint is listed, verified, loaded, opened lazily (a slice of every
leaf) and its telemetry read, in a separate process with an audit hook.  Targets: only
the library's own errors (subclasses of ComputableFlowsError), every case meant to be
refused refused by load and by verify, no file opened or directory listed outside the
checkpoint, no code executed (no exec/compile/unpickling/subprocess/import; the canary
file a pickle payload would create never appears), bounded memory per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ._hostile import build_corpus
from .conftest import HERE, add

MEMORY_LIMIT = 160 << 20
"""Peak resident memory added by a case: the largest is one 64 MiB chunk of the sparse case."""


def test_hostile_corpus(tmp_path, figures):
    store, outside, canary = (str(tmp_path / n) for n in ("store", "outside", "canary"))
    os.makedirs(outside)
    cases = build_corpus(store, outside, canary)
    assert len(cases) >= 50
    p = subprocess.run(
        [sys.executable, os.path.join(HERE, "_hostile.py"), store, outside, canary],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    results = {r["id"]: r for r in map(json.loads, p.stdout.splitlines())}
    refused = harmless = harmless_refused = 0
    for cid, must_refuse in cases:
        r = results[cid]
        assert r["violations"] == [], (cid, r["violations"])
        assert set(r["ops"]) == {"verify", "load", "view", "telemetry"}, (cid, r["ops"])  # every operation ran
        for op, outcome in r["ops"].items():
            assert not outcome.startswith("FOREIGN"), (cid, op, outcome)
        if must_refuse:
            assert r["ops"]["load"] != "ok" and r["ops"]["verify"] != "ok", (cid, r["ops"])
            refused += 1
        elif all(r["ops"][op] == "ok" for op in ("load", "view", "telemetry")):
            harmless += 1  # counted as "read without error" only when it was
        else:
            harmless_refused += 1  # allowed (a library error), but not "read without error"
        assert r["peak"] < MEMORY_LIMIT, (cid, r["peak"])
    assert results["<self-test>"]["violations"], "the audit hook did not catch an open outside the checkpoint"
    listing = results["<list>"]
    assert listing["ops"]["list"] == "ok" and listing["violations"] == []
    assert not os.path.exists(canary), "a pickle payload ran"
    fig = figures["7. hostile checkpoints (crafted, read under an audit hook)"]
    add(fig, "crafted checkpoints", len(cases))
    add(fig, "  refused by load and by verify (library errors only)", refused)
    add(fig, "  harmless, read without error (long strings, wide trees, odd names)", harmless)
    add(fig, "  harmless, refused anyway (library errors only)", harmless_refused)
    add(fig, "operations run on them (verify, load, lazy slices, telemetry)", 4 * len(cases))
    fig["peak memory of the worst case (MiB)"] = round(max(results[c]["peak"] for c, _ in cases) / 2**20, 1)
    fig["foreign exceptions / files opened outside / code executed"] = "0 / 0 / 0"
