"""Scenario 2 (issue 5): the order of a save's I/O, recorded and checked.

SIGKILL cannot show a missing fsync (the page cache survives a killed process; it does
not survive a power cut), so the forked writer records every file-system call of a save
(``_harness.IOTracer`` with ``trace``) and this test checks the commit protocol of
spec/FORMAT.md section 3 on the record:

- every file the save creates is written, then fsynced (``fdatasync``), before the rename;
- every directory the save creates (the checkpoint directory included) is fsynced after
  the last entry was created in it, and before the rename;
- a hard-linked chunk (incremental save, rollback) is a file whose data was fsynced
  before the link, by an earlier save or by this one (checked by inode), also when the
  earlier checkpoint was saved with ``durable=False``;
- where the library syncs the whole file system instead (``syncfs`` on Linux, what it
  guarantees: every file's data and size and every directory entry of that file system,
  as of the call, durable when it returns), a ``syncfs`` of the staging directory's file
  system after a file's last write, a directory's last entry or a link, and before the
  rename, stands for that file's, directory's or link's sync;
- the rename publishes the staging directory as the checkpoint, without replacing
  (``renameat2`` with ``RENAME_NOREPLACE``), and the store directory is fsynced after it;
- nothing is written into the checkpoint after the rename;
- a delete renames the checkpoint away and then fsyncs the store directory;
- ``durable=False`` fsyncs nothing (documented: atomic, not durable).
"""

from __future__ import annotations

import os

import pytest

from computable_flows_shim import CheckpointManager
from computable_flows_shim._format.io import HAVE_SYNCFS

from ._harness import FSYNCS, SHAPES, WRITES
from .conftest import add

O_CREAT = os.O_CREAT


def norm(p: str) -> str:
    return os.path.normpath(p)


def check_commit_order(events: list[dict], store: str, final: str, fsynced_before: set[int]) -> dict:
    """Check one traced save (or rollback) against the commit protocol; returns counts."""
    events = sorted(events, key=lambda e: e["n"])
    renames = [e for e in events if e["op"] in ("renameat2", "rename") and e["path"].endswith(" -> " + final)]
    assert len(renames) == 1, [e for e in events if e["op"] in ("renameat2", "rename")]
    rename = renames[0]
    assert rename["op"] == "renameat2", "the commit rename must not replace (RENAME_NOREPLACE)"
    tmp = norm(rename["path"].split(" -> ")[0])
    assert norm(os.path.dirname(tmp)) == norm(os.path.join(store, ".cfs-staging"))
    r = rename["n"]

    def under(p: str) -> bool:
        p = norm(p)
        return p == tmp or p.startswith(tmp + os.sep)

    created_files: dict[str, int] = {}
    created_dirs: dict[str, int] = {}
    linked: dict[str, tuple[int, str]] = {}
    last_entry: dict[str, int] = {}  # directory -> last creation of an entry in it
    last_write: dict[str, int] = {}
    fsyncs: dict[str, list[int]] = {}
    synced = set(fsynced_before)  # inodes whose data is durable at this point of the record
    unsynced_links = []
    # syncfs calls through a descriptor of the staging directory (or below it): the whole file system
    whole_fs = [e["n"] for e in events if e["op"] == "syncfs" and under(e["path"])]
    for e in events:
        op, n = e["op"], e["n"]
        if op in FSYNCS and op != "syncfs" and e.get("ino") is not None:
            synced.add(e["ino"])
        if op == "open" and e["flags"] & O_CREAT and under(e["path"]):
            created_files[norm(e["path"])] = n
            last_entry[norm(os.path.dirname(e["path"]))] = n
        elif op == "mkdir" and under(e["path"]):
            created_dirs[norm(e["path"])] = n
            last_entry[norm(os.path.dirname(e["path"]))] = n
        elif op == "link":
            src, dst = e["path"].split(" -> ")
            if under(dst):
                linked[norm(dst)] = (n, src)
                last_entry[norm(os.path.dirname(dst))] = n
                if os.stat(src).st_ino not in synced and not any(n < m < r for m in whole_fs):
                    unsynced_links.append(f"{dst} links {src}, whose data was not fsynced before the link")
        elif op in WRITES:
            last_write[norm(e["path"])] = n
        elif op in FSYNCS and op != "syncfs":
            fsyncs.setdefault(norm(e["path"]), []).append(n)
        if (
            n > r
            and op in ("open", "mkdir", "link", *WRITES)
            and (
                norm(e["path"].split(" -> ")[-1]).startswith(norm(final) + os.sep)
                and (op != "open" or e["flags"] & O_CREAT)
            )
        ):
            raise AssertionError(f"written into the checkpoint after the commit rename: {e}")
    assert tmp in created_dirs and created_files, "the record shows no file created in the staging directory"
    for f, n in created_files.items():
        syncs = [m for m in fsyncs.get(f, []) + whole_fs if m > last_write.get(f, n)]
        assert syncs and min(syncs) < r, f"file {f} not fsynced after its last write and before the rename"
    for d in created_dirs:
        syncs = [m for m in fsyncs.get(d, []) + whole_fs if m > last_entry.get(d, created_dirs[d])]
        assert syncs and min(syncs) < r, f"directory {d} not fsynced after its last entry and before the rename"
    assert not unsynced_links, unsynced_links[:3]
    after = [m for m in fsyncs.get(norm(store), []) if m > r]
    assert after, "the store directory is not fsynced after the commit rename"
    return {"files": len(created_files), "dirs": len(created_dirs), "links": len(linked), "syncfs": len(whole_fs)}


def fsynced_inodes(events: list[dict]) -> set[int]:
    return {e["ino"] for e in events if e["op"] in FSYNCS and e.get("ino") is not None}


SYNCS = ["syncfs", "per-file"] if HAVE_SYNCFS else ["per-file"]


@pytest.mark.parametrize("sync", SYNCS)
@pytest.mark.parametrize("shape", SHAPES)
def test_save_fsyncs_everything_before_the_rename_and_the_store_after(forkserver, tmp_path, shape, sync, figures):
    """Both ways a save makes itself durable: one syncfs where the platform has it, and the
    per-file syncs taken elsewhere (forced here by hiding syncfs from the writer)."""
    store = str(tmp_path / "store")
    fsynced: set[int] = set()
    totals = {"files": 0, "dirs": 0, "links": 0, "syncfs": 0}
    for it in range(3):  # the later saves of a run hard-link unchanged chunks from the previous one
        r = forkserver(
            op="save",
            store=store,
            shape=shape,
            run=shape,
            iteration=it,
            plan={"trace": True},
            no_syncfs=sync != "syncfs",
        )
        res = r["result"]
        assert res["status"] == "ok", res
        got = check_commit_order(res["events"], store, os.path.join(store, f"{shape}-i{it:012d}"), fsynced)
        fsynced |= fsynced_inodes(res["events"])
        for k in totals:
            totals[k] += got[k]
    if shape == "incremental":
        assert totals["links"] > 0
    assert totals["syncfs"] == (3 if sync == "syncfs" else 0), totals  # the path under test was taken
    fig = figures["2. durability order (every save's I/O recorded and checked)"]
    add(fig, "saves traced", 3)
    add(fig, "files synced (fdatasync or syncfs) before the rename", totals["files"])
    add(fig, "directories synced (fsync or syncfs) before the rename", totals["dirs"])
    add(fig, "hard links to data synced before the rename", totals["links"])
    fig["missing fsyncs / store not fsynced after rename"] = "0 / 0"


def test_rollback_and_delete_order(forkserver, tmp_path, figures):
    store = str(tmp_path / "store")
    r = forkserver(op="save", store=store, shape="tree", run="a", iteration=1, plan={"trace": True})
    assert r["result"]["status"] == "ok", r
    fsynced = fsynced_inodes(r["result"]["events"])
    r = forkserver(op="rollback", store=store, src="a-i000000000001", run="b", plan={"trace": True})
    assert r["result"]["status"] == "ok", r
    got = check_commit_order(r["result"]["events"], store, os.path.join(store, "b-i000000000001"), fsynced)
    assert got["links"] > 10
    r = forkserver(op="delete", store=store, src="b-i000000000001", plan={"trace": True})
    events = sorted(r["result"]["events"], key=lambda e: e["n"])
    gone = [e for e in events if e["op"] == "rename" and e["path"].startswith(os.path.join(store, "b-i0"))]
    assert len(gone) == 1 and "/.cfs-trash/" in gone[0]["path"]
    assert [e for e in events if e["op"] in FSYNCS and norm(e["path"]) == norm(store) and e["n"] > gone[0]["n"]]
    assert not CheckpointManager(store).store.exists("b-i000000000001")
    fig = figures["2. durability order (every save's I/O recorded and checked)"]
    add(fig, "rollbacks and deletes traced", 2)


def test_non_durable_save_fsyncs_nothing(forkserver, tmp_path):
    store = str(tmp_path / "store")
    r = forkserver(op="save", store=store, shape="tree", run="a", iteration=1, durable=False, plan={"trace": True})
    assert r["result"]["status"] == "ok"
    ops = {e["op"] for e in r["result"]["events"]}
    assert not ops & set(FSYNCS) and "renameat2" in ops
    # ...and the order checker is not vacuous: it refuses that record
    with pytest.raises(AssertionError, match="not fsynced"):
        check_commit_order(r["result"]["events"], store, os.path.join(store, "a-i000000000001"), set())


def test_durable_saves_never_link_data_a_non_durable_save_left_unsynced(forkserver, tmp_path, figures):
    """A non-durable save (fsyncs nothing) followed by durable saves of the same run (which
    hard-link its unchanged chunks) and a durable rollback from a non-durable checkpoint:
    every linked file's data is fsynced before it is linked."""
    store = str(tmp_path / "store")
    r = forkserver(op="save", store=store, shape="incremental", run="m", iteration=0, durable=False)
    assert r["result"]["status"] == "ok", r
    links = 0
    r = forkserver(op="save", store=store, shape="incremental", run="m", iteration=1, plan={"trace": True})
    assert r["result"]["status"] == "ok", r
    links += check_commit_order(r["result"]["events"], store, os.path.join(store, "m-i000000000001"), set())["links"]
    r = forkserver(op="save", store=store, shape="tree", run="n", iteration=0, durable=False)
    assert r["result"]["status"] == "ok", r
    r = forkserver(op="rollback", store=store, src="n-i000000000000", run="b", plan={"trace": True})
    assert r["result"]["status"] == "ok", r
    links += check_commit_order(r["result"]["events"], store, os.path.join(store, "b-i000000000000"), set())["links"]
    assert links > 10
    fig = figures["2. durability order (every save's I/O recorded and checked)"]
    add(fig, "links to data a durable=False save left unsynced, synced first", links)
