"""Scenario 5 (issue 5): damage a committed checkpoint, thousands of ways; it never loads wrong.

Each trial takes a pristine checkpoint (nested state of many dtypes, a PRNG key, scalars,
a telemetry history of two chunks per column with a text column and events) and does one
of: flip one bit, truncate, zero a block, delete a file, add a file, swap two files, in a
chunk file (data) or in a zarr.json (metadata), at a random place.  A trial whose damage
changes no byte (zeroing zeros, swapping identical files) is drawn again, so every trial
counts.  Then:

- ``verify_checkpoint`` must report a problem (and ``cfs verify`` exits 1, saying DAMAGED,
  for a sample of trials);
- ``load_checkpoint`` must raise a library error naming the checkpoint; for damage to a
  chunk file it must name the leaf (or telemetry column, or pack) and the chunk;
- a load that does not raise must return exactly the saved data.

Classification, stated here so that it cannot drift: "detected" means verify reported a
problem and load raised.  The one kind of damage a load does not look for is an extra
file that no array refers to (a load opens what the metadata names; it does not list
directories): such trials count as "verify detected, load returned the exact data", and
only for added files.  Every other outcome fails the test: a silently wrong load, or
damage verify does not report.  Metadata is covered by CRC32C too (the root's
``cfs_metadata_crc32c`` and ``cfs_root_crc32c``, spec/FORMAT.md), so a flipped bit that
leaves valid JSON with another value (a shape, a key, a scalar, ``created_at``) is
detected like any other.
"""

from __future__ import annotations

import collections
import os
import random
import shutil

import jax
import numpy as np
import pytest

from computable_flows_shim import CheckpointError, CheckpointManager, ComputableFlowsError
from computable_flows_shim.cli._main import main as cfs_main

from .conftest import add, assert_same_tree

KINDS = ("bitflip", "truncate", "zero", "delete", "extra", "swap")
NT = collections.namedtuple("NT", "lr mom")


def pristine_args() -> dict:
    rng = np.random.default_rng(0)
    n = 66_000  # two chunks per telemetry column
    import ml_dtypes

    state = {
        "w": rng.standard_normal((64, 33)).astype(np.float32),
        "b": rng.standard_normal(33).astype(ml_dtypes.bfloat16),
        "steps": np.int64(1234),
        "key": jax.random.key(42),
        "opt": [rng.integers(0, 255, (3, 2), dtype=np.uint8), (rng.random(4) > 0.5, None, 0.5), NT(1e-3, 0.9)],
        "nested": {"deep": {"v": np.arange(10, dtype=np.int16), "q": np.arange(-4, 4).astype(ml_dtypes.int4)}},
        "name": "pristine",
    }
    hist = {
        "iter": np.arange(n, dtype=np.int32),
        "E": rng.standard_normal(n).astype(np.float32),
        "phase": ["GREEN", "AMBER", "RED"] * (n // 3),
        "events": [{"type": "CHECKPOINT_CREATED", "iter": i, "payload": {"note": "é" * i}} for i in range(3)],
    }
    return {
        "state": state,
        "flow_config": {"op": "blur", "sigma": 1.5, "levels": [1, 2]},
        "telemetry_history": hist,
        "certificates": {"gamma": 0.25},
        "metadata": {"user": "x"},
    }


def snapshot(out: dict) -> dict:
    """What a load returns, in comparable form (PRNG keys as their data)."""
    state = jax.tree_util.tree_map(
        lambda x: (
            np.asarray(jax.random.key_data(x))
            if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else x
        ),
        out["state"],
    )
    return {**out, "state": state, "created_at": out["created_at"]}


def same_load(got: dict, want: dict) -> bool:
    try:
        assert_same_tree(snapshot(got)["state"], want["state"])
        for k in want:
            if k in ("state", "telemetry"):
                continue
            assert got[k] == want[k], k
        tg, tw = got["telemetry"], want["telemetry"]
        assert sorted(tg) == sorted(tw)
        for k in tw:
            if k == "events":
                assert tg[k] == tw[k]
            else:
                assert tg[k].dtype == tw[k].dtype and list(tg[k]) == list(tw[k]), k
        return True
    except AssertionError:
        return False


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Damager:
    """Applies one random damage to the working copy ``ckpt`` and undoes it from ``pristine``."""

    def __init__(self, ckpt: str, pristine: str, rng: random.Random) -> None:
        self.ckpt, self.pristine, self.rng = ckpt, pristine, rng
        self.files = {"data": [], "metadata": []}
        for base, _, files in os.walk(pristine):
            for f in files:
                rel = os.path.relpath(os.path.join(base, f), pristine)
                self.files["metadata" if f == "zarr.json" else "data"].append(rel)
        for v in self.files.values():
            v.sort()
        self.touched: list[str] = []

    def path(self, rel: str) -> str:
        return os.path.join(self.ckpt, rel)

    def restore(self) -> None:
        for rel in self.touched:
            p, src = self.path(rel), os.path.join(self.pristine, rel)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.unlink(p)
            if os.path.exists(src):
                if os.path.isdir(src):
                    shutil.copytree(src, p)
                else:
                    shutil.copyfile(src, p)
        self.touched = []

    def apply(self, kind: str, where: str) -> str | None:
        """Damage one file in the ``where`` class; returns a description, or None when the
        drawn damage would change no byte (the caller draws again)."""
        rng = self.rng
        rel = rng.choice(self.files[where])
        p = self.path(rel)
        data = read_bytes(p)
        if kind == "bitflip":
            i, bit = rng.randrange(len(data)), rng.randrange(8)
            new = data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]
            desc = f"flip bit {bit} of byte {i}"
        elif kind == "truncate":
            n = rng.randrange(len(data))
            new, desc = data[:n], f"truncate to {n} of {len(data)} bytes"
        elif kind == "zero":
            n = rng.choice([1, 4, 16, 512, 4096])
            i = rng.randrange(len(data))
            new = data[:i] + bytes(min(n, len(data) - i)) + data[i + n :]
            desc = f"zero {n} bytes at {i}"
        elif kind == "delete":
            self.touched.append(rel)
            os.unlink(p)
            return f"delete {rel}"
        elif kind == "extra":
            d = os.path.dirname(rel)
            choice = rng.randrange(4)
            if choice == 0:  # a chunk key beyond the grid, or a stray file
                name = rng.choice(["c.9", "c.0.9", "c.7.7", "junk", ".hidden", "zarr.json.bak", "c"])
                extra = os.path.join(d, name)
                if os.path.lexists(self.path(extra)):
                    return None
                with open(self.path(extra), "wb") as f:
                    f.write(data[: rng.randrange(1, len(data) + 1)])
                self.touched.append(extra)
                return f"extra file {extra}"
            if choice == 1:  # a copy of an array directory as a new telemetry column or state node
                src = os.path.dirname(rng.choice([m for m in self.files["metadata"] if m.count(os.sep) == 2]))
                group = rng.choice(["telemetry", "state", "state/nested"])
                extra = os.path.join(group, "stray" + str(rng.randrange(100)))
                shutil.copytree(self.path(src), self.path(extra))
                self.touched.append(extra)
                return f"extra array directory {extra} (copy of {src})"
            if choice == 2:  # a zarr.json where there was none (a group appears)
                extra = os.path.join(rng.choice(["state", "telemetry", "state/nested"]), "newgroup", "zarr.json")
                os.makedirs(os.path.dirname(self.path(extra)))
                with open(self.path(extra), "w") as f:
                    f.write('{"zarr_format":3,"node_type":"group","attributes":{}}')
                self.touched.append(os.path.dirname(extra))
                return f"extra group {extra}"
            extra = os.path.join(d, "lnk")  # a symlink inside the checkpoint
            os.symlink(os.path.basename(rel), self.path(extra))
            self.touched.append(extra)
            return f"extra symlink {extra}"
        elif kind == "swap":
            size = len(data)
            others = [
                o
                for o in self.files[where]
                if o != rel and os.path.getsize(self.path(o)) == size and read_bytes(self.path(o)) != data
            ]
            if not others:
                return None
            other = rng.choice(others)
            od = read_bytes(self.path(other))
            with open(self.path(other), "wb") as f:
                f.write(data)
            with open(p, "wb") as f:
                f.write(od)
            self.touched += [rel, other]
            return f"swap {rel} <-> {other}"
        else:
            raise ValueError(kind)
        if new == data:
            return None
        with open(p, "wb") as f:
            f.write(new)
        self.touched.append(rel)
        return f"{desc} of {rel}"


def run_trials(tmp_path, trials: int, seed: int, figures: dict, capsys) -> None:
    store = str(tmp_path / "store")
    mgr = CheckpointManager(store)
    cid = mgr.create_checkpoint("c", 7, **pristine_args())
    ckpt = mgr.checkpoint_path(cid)
    pristine = str(tmp_path / "pristine")
    shutil.copytree(ckpt, pristine)
    want = snapshot(mgr.load_checkpoint(cid))
    assert mgr.verify_checkpoint(cid).ok
    rng = random.Random(seed)
    dmg = Damager(ckpt, pristine, rng)
    outcome: collections.Counter = collections.Counter()
    by_kind: collections.Counter = collections.Counter()
    redrawn = 0
    cli_checked = 0
    for t in range(trials):
        kind = KINDS[t % len(KINDS)]
        where = "data" if (t // len(KINDS)) % 2 == 0 else "metadata"
        while (desc := dmg.apply(kind, where)) is None:
            dmg.restore()
            redrawn += 1
        what = f"trial {t}: {kind} in {where}: {desc}"
        report = mgr.verify_checkpoint(cid)
        try:
            out = mgr.load_checkpoint(cid)
        except CheckpointError as e:
            msg = str(e)
            assert isinstance(e, ComputableFlowsError)
            assert repr(cid) in msg, (what, msg)
            if where == "data" and kind in ("bitflip", "truncate", "zero", "delete", "swap"):
                names = ("leaf state", "telemetry column", ", pack packed/")
                assert "chunk 'c" in msg and any(n in msg for n in names), (what, msg)
            assert not report.ok, f"{what}: load raised ({msg}) but verify reported nothing"
            outcome["detected by verify and by load"] += 1
        else:
            assert same_load(out, want), f"SILENTLY WRONG LOAD: {what}"
            assert not report.ok, f"UNDETECTED: {what}: verify reported nothing and load returned the saved data"
            assert kind == "extra", f"{what}: load did not detect it ({report.problems})"
            outcome["extra file: verify detected, load returned the exact saved data"] += 1
        by_kind[f"{kind} ({where})"] += 1
        if t % 25 == 0:  # people use cfs verify
            capsys.readouterr()
            assert cfs_main(["--store", store, "verify", cid]) == 1, what
            assert "DAMAGED" in capsys.readouterr().out
            cli_checked += 1
        dmg.restore()
    assert mgr.verify_checkpoint(cid).ok  # the restore really restored
    fig = figures["5. corruption (single damage, random place)"]
    add(fig, "trials", trials)
    for k, v in sorted(by_kind.items()):
        add(fig, f"  {k}", v)
    for k, v in outcome.items():
        add(fig, k, v)
    add(fig, "cfs verify runs on damaged checkpoints (all exit 1, DAMAGED)", cli_checked)
    add(fig, "draws changing no byte, drawn again (not counted)", redrawn)
    fig["silently wrong loads / damage verify missed"] = "0 / 0"


def test_corruption_1200_trials(tmp_path, figures, capsys):
    run_trials(tmp_path, 1200, 11, figures, capsys)


@pytest.mark.slow
def test_corruption_10000_trials(tmp_path, figures, capsys):
    run_trials(tmp_path, 10_000, 12, figures, capsys)
