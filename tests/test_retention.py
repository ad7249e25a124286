"""Retention policies, alone and combined, on a store of hundreds of checkpoints across
branched runs: the newest, tagged and branched-from checkpoints always survive, and the
dry-run report is exactly what the real cleanup then does."""

import datetime as dt
import os
import shutil

import numpy as np
import pytest

from computable_flows_shim import (
    AnyOf,
    CheckpointInfo,
    CheckpointManager,
    KeepBest,
    KeepEvery,
    KeepLatest,
    KeepPerInterval,
    KeepTagged,
    RetentionPolicy,
    any_of,
)

# ---------------------------------------------------------------- policies on plain CheckpointInfo


def info(it, run="r", created=None, summary=None, certs=None, lineage=None):
    created = created or f"2024-01-01T00:{it // 60 % 60:02d}:{it % 60:02d}.000000Z"
    return CheckpointInfo(f"{run}-i{it:012d}", run, it, created, "", {}, certs or {}, {}, lineage or {}, summary or {})


def kept(policy, infos, tags=None):
    return set(policy.keeps(infos, tags or {}))


def test_keep_latest_and_every():
    infos = [info(i) for i in range(0, 100, 5)]
    assert kept(KeepLatest(3), infos) == {"r-i000000000095", "r-i000000000090", "r-i000000000085"}
    assert kept(KeepLatest(100), infos) == {i.checkpoint_id for i in infos}
    assert kept(KeepEvery(20), infos) == {f"r-i{i:012d}" for i in (0, 20, 40, 60, 80)}
    assert KeepLatest(3).keeps(infos, {})["r-i000000000095"] == ("keep_latest(3)",)
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            KeepLatest(bad)
        with pytest.raises(ValueError):
            KeepEvery(bad)


def test_keep_per_interval_keeps_the_first_of_each_interval_and_is_stable():
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    times = [0, 1, 59, 60, 61, 179, 180, 400]  # seconds after base
    infos = [
        info(i, created=(base + dt.timedelta(seconds=s)).isoformat().replace("+00:00", "Z"))
        for i, s in enumerate(times)
    ]
    first = kept(KeepPerInterval(60), infos)
    assert first == {f"r-i{i:012d}" for i in (0, 3, 5, 6, 7)}  # 0s, 60s, 179s, 180s, 400s
    survivors = [i for i in infos if i.checkpoint_id in first]
    assert kept(KeepPerInterval(60), survivors) == first  # applying again deletes nothing more
    assert kept(KeepPerInterval(60), [info(1, created="not a time")]) == set()
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            KeepPerInterval(bad)


def test_keep_best_min_max_skips_missing_and_non_finite():
    infos = [
        info(1, summary={"final_energy": 5.0}, certs={"gamma": 0.1}),
        info(2, summary={"final_energy": 3.0}, certs={"gamma": 0.3}),
        info(3, summary={"final_energy": "NaN"}, certs={"gamma": "Infinity"}),
        info(4, summary={}, certs={}),
        info(5, summary={"final_energy": 4.0}, certs={"gamma": 0.2}),
        info(6, summary={"final_energy": 3.0}, certs={"gamma": 0.2}),  # ties go to the newer
    ]
    assert kept(KeepBest("final_energy", 2), infos) == {"r-i000000000006", "r-i000000000002"}
    assert kept(KeepBest("E", 1), infos) == {"r-i000000000006"}  # the column name means its final value
    assert kept(KeepBest("gamma", 1, "max"), infos) == {"r-i000000000002"}
    assert kept(KeepBest("gamma", 10, "max"), infos) == {f"r-i{i:012d}" for i in (1, 2, 5, 6)}
    assert kept(KeepBest("nope", 3), infos) == set()
    assert KeepBest("final_energy", 2).keeps(infos, {})["r-i000000000006"] == (
        "keep_best(final_energy, min, 2): #1 final_energy=3",
    )
    with pytest.raises(ValueError, match="mode"):
        KeepBest("E", 1, "median")
    with pytest.raises(ValueError):
        KeepBest("E", 0)


def test_keep_tagged_and_combinations():
    infos = [info(i) for i in range(10)]
    tags = {"r-i000000000002": frozenset({"best"}), "r-i000000000004": frozenset({"paper", "x"})}
    assert kept(KeepTagged(), infos, tags) == {"r-i000000000002", "r-i000000000004"}
    assert kept(KeepTagged("paper"), infos, tags) == {"r-i000000000004"}
    assert KeepTagged("paper").keeps(infos, tags)["r-i000000000004"] == ("tagged: paper",)
    p = any_of(KeepLatest(2), KeepEvery(3) | KeepTagged("best"))
    assert isinstance(p, AnyOf) and len(p.policies) == 3  # flattened
    assert str(p) == "any_of(keep_latest(2), keep_every(3), keep_tagged(best))"
    assert kept(p, infos, tags) == {f"r-i{i:012d}" for i in (9, 8, 0, 3, 6, 2)}
    assert p.keeps(infos, tags)["r-i000000000009"] == ("keep_latest(2)", "keep_every(3)")
    assert any_of(KeepLatest(1)) == KeepLatest(1)
    with pytest.raises(ValueError):
        any_of()
    with pytest.raises(TypeError):
        any_of(KeepLatest(1), "latest")


# ---------------------------------------------------------------- a big store of branched runs

N_MAIN = 160


def _save(mgr, run, it, energy):
    return mgr.create_checkpoint(
        run,
        it,
        {"x": np.full(4, it, np.float32)},
        telemetry_history={"iter": [it], "E": [energy]},
        certificates={"gamma": 1.0 / (1 + it)},
    )


TAGS = {"main-i000000000500": "paper-figure-3", "main-i000000000005": "first", "b1-i000000000200": "best"}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """main: 160 checkpoints whose energy first improves then worsens (best at 60; the
    newest is the worst); b1 branched from main@100 with 60 more; b2 branched from b1@130
    with 30 more; b3 branched from main@150, nothing more.  Tags on a few."""
    root = tmp_path_factory.mktemp("retention") / "store"
    mgr = CheckpointManager(root, durable=False)
    for it in range(0, N_MAIN * 5, 5):
        _save(mgr, "main", it, float((it - 300) ** 2) + 1.0)
    mgr.rollback_to_checkpoint("main-i000000000100", "b1")
    for it in range(105, 405, 5):
        _save(mgr, "b1", it, 1000.0 - it)
    mgr.rollback_to_checkpoint("b1-i000000000130", "b2")
    for it in range(135, 285, 5):
        _save(mgr, "b2", it, float(it))
    mgr.rollback_to_checkpoint("main-i000000000150", "b3")
    for cid, tag in TAGS.items():
        mgr.tag_checkpoint(cid, tag)
    return str(root)


@pytest.fixture
def store(template, tmp_path):
    root = str(tmp_path / "store")
    shutil.copytree(template, root, symlinks=True, copy_function=os.link)  # files are never modified in place
    return CheckpointManager(root, durable=False)


PROTECTED = {
    "main": {
        "main-i000000000795": "newest",
        "main-i000000000500": "tagged: paper-figure-3",
        "main-i000000000005": "tagged: first",
        "main-i000000000100": "lineage: branch run b1",
        "main-i000000000150": "lineage: branch run b3",
    },
    "b1": {
        "b1-i000000000400": "newest",
        "b1-i000000000200": "tagged: best",
        "b1-i000000000130": "lineage: branch run b2",
        "b1-i000000000100": "lineage: branch point from main-i000000000100",
    },
}


def _ids(mgr, run=None):
    return {i.checkpoint_id for i in mgr.list_checkpoints(run)}


def _expected_policy_keeps(policy, mgr, run):
    infos = mgr.list_checkpoints(run)
    tags = {cid: frozenset(t) for cid, t in mgr.tagged().items()}
    return set(policy.keeps(infos, tags))


POLICIES = [
    KeepLatest(5),
    KeepEvery(100),
    KeepBest("final_energy", 3),
    KeepBest("gamma", 2, "max"),
    KeepPerInterval(0.05),
    KeepTagged(),
    any_of(KeepLatest(3), KeepEvery(250), KeepBest("E", 2), KeepTagged("best")),
]


@pytest.mark.parametrize("policy", POLICIES, ids=str)
def test_dry_run_equals_cleanup_and_protections_hold(store, policy):
    for run in ("b1", "main"):  # the branch first: its cleanup must keep main's branch points protected
        _check_run(store, run, policy)


def _check_run(store, run, policy):
    before = _ids(store)
    others = {cid for cid in before if not cid.startswith(run + "-i")}
    expected = _expected_policy_keeps(policy, store, run) | set(PROTECTED[run])
    dry = store.apply_retention(run, policy, dry_run=True)
    assert _ids(store) == before  # a dry run deletes nothing
    assert set(dry.kept) == expected
    assert set(dry.kept) | set(dry.deleted) == {cid for cid in before if cid.startswith(run + "-i")}
    by_id = {d.checkpoint_id: d for d in dry.decisions}
    for cid, reason in PROTECTED[run].items():
        assert by_id[cid].keep and reason in by_id[cid].reasons, (cid, by_id[cid])
    for d in dry.decisions:
        assert d.keep == bool(d.reasons) and d.action == ("keep" if d.keep else "delete")
    assert [d.iteration for d in dry.decisions] == sorted((d.iteration for d in dry.decisions), reverse=True)

    real = store.apply_retention(run, policy)
    assert real.decisions == dry.decisions and not real.dry_run and dry.dry_run
    assert _ids(store) == others | set(dry.kept)
    again = store.apply_retention(run, policy, dry_run=True)
    assert again.deleted == []  # idempotent: nothing more to delete
    # every checkpoint tagged in the template still exists, tags intact (store.tagged() alone
    # could not show it: it lists only the tags of checkpoints that still exist)
    assert {cid: [tag] for cid, tag in TAGS.items()} == store.tagged()
    for i in store.list_checkpoints():  # every branch still has its parent
        parent = i.lineage.get("rollback_from")
        assert parent is None or parent in _ids(store)


def test_worsening_metric_keeps_the_newest(store):
    report = store.apply_retention("main", KeepBest("final_energy", 2), dry_run=True)
    newest = report.decisions[0]
    assert newest.checkpoint_id == "main-i000000000795" and newest.reasons == ("newest",)
    best = [d.checkpoint_id for d in report.decisions if any(r.startswith("keep_best") for r in d.reasons)]
    assert sorted(best) == ["main-i000000000300", "main-i000000000305"]  # E=1 at 300, then 26 at 295/305: newer wins
    store.apply_retention("main", KeepBest("final_energy", 2))
    assert store.get_latest_checkpoint("main") == "main-i000000000795"


def test_force_drops_lineage_protection_only(store):
    report = store.apply_retention("main", KeepLatest(1), force=True)
    assert set(report.kept) == {"main-i000000000795", "main-i000000000500", "main-i000000000005"}
    assert "main-i000000000100" in report.deleted and "main-i000000000150" in report.deleted
    # the branches stay whole: rollback hard-linked their files
    assert store.verify_checkpoint("b1-i000000000100").ok and store.verify_checkpoint("b3-i000000000150").ok
    # with the parent gone, b1's branch point protects nothing and may go
    b1 = store.apply_retention("b1", KeepLatest(1), dry_run=True)
    assert "b1-i000000000100" in b1.deleted and "b1-i000000000130" in b1.kept


def test_branch_point_keeps_parent_protected_while_branch_exists(store):
    """Cleaning the branch first must not silently expose the parent."""
    store.apply_retention("b2", KeepLatest(1))
    assert "b2-i000000000130" in _ids(store)  # kept: it records the branch from b1@130
    assert "b1-i000000000130" in store.apply_retention("b1", KeepLatest(1), dry_run=True).kept
    # deleting the whole branch run explicitly releases the parent
    for cid in _ids(store, "b2"):
        assert store.delete_checkpoint(cid)
    assert "b1-i000000000130" in store.apply_retention("b1", KeepLatest(1), dry_run=True).deleted


def test_cleanup_old_checkpoints_is_keep_latest_with_protections(store):
    n_before = len(_ids(store, "main"))
    deleted = store.cleanup_old_checkpoints("main", keep_last=2)
    left = _ids(store, "main")
    assert deleted == n_before - len(left)
    assert left == {"main-i000000000795", "main-i000000000790"} | set(PROTECTED["main"])
    with pytest.raises(ValueError, match="keep_last"):
        store.cleanup_old_checkpoints("main", keep_last=0)


def test_progress_callback_and_errors(store):
    seen = []
    report = store.apply_retention(
        "b2", KeepLatest(2), progress=lambda done, total, cid: seen.append((done, total, cid))
    )
    assert len(report.deleted) == 28  # b2's 31 less the newest 2 and its branch point (b1@130 exists)
    assert [s[2] for s in seen] == list(reversed(report.deleted))  # oldest first
    assert [s[0] for s in seen] == list(range(1, len(report.deleted) + 1))
    assert all(s[1] == len(report.deleted) for s in seen)
    with pytest.raises(ValueError, match="no policy"):
        store.apply_retention("b2")
    assert store.apply_retention("nobody", KeepLatest(1)).decisions == ()
    assert isinstance(KeepLatest(1), RetentionPolicy)


# ---------------------------------------------------------------- a manager's default policy


def test_default_policy_applies_after_each_save(tmp_path):
    policy = KeepLatest(3) | KeepEvery(10)
    mgr = CheckpointManager(tmp_path / "s", durable=False, retention=policy)
    for it in range(1, 41):
        _save(mgr, "r", it, float(it))
        if it == 7:
            mgr.tag_checkpoint("r-i000000000007", "keep-me")
        expected = {f"r-i{j:012d}" for j in range(1, it + 1) if j > it - 3 or j % 10 == 0 or j == 7}
        assert _ids(mgr, "r") == expected
    for it in range(41, 46):  # background saves clean up too
        mgr.create_checkpoint("r", it, {"x": np.zeros(2)}, blocking=False)
    mgr.wait_until_finished()
    assert _ids(mgr, "r") == {f"r-i{j:012d}" for j in (7, 10, 20, 30, 40, 43, 44, 45)}
    assert mgr.apply_retention("r", dry_run=True).deleted == []


def test_run_flow_uses_the_managers_policy(tmp_path):
    from computable_flows_shim import make_example, run_flow

    spec, y, _ = make_example("deconv1d")
    mgr = CheckpointManager(tmp_path / "s", durable=False, retention=KeepLatest(2))
    r = run_flow(spec, y, iters=100, checkpoint_manager=mgr, checkpoint_interval=10, run_id="f")
    mgr.wait_until_finished()
    assert r.last_checkpoint == "f-i000000000100"
    assert _ids(mgr, "f") == {"f-i000000000090", "f-i000000000100"}
    assert not os.listdir(os.path.join(mgr.store.root, ".cfs-trash"))
