"""CheckpointManager behaviour: ids, listing, latest, delete, rollback, cleanup, targets, bad input."""

import collections
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from computable_flows_shim import (
    CheckpointExistsError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    InvalidRunIdError,
    MetadataError,
    TargetMismatchError,
    UnsupportedLeafError,
)


def state(i=0):
    return {
        "x": np.arange(10.0) + i,
        "w": {"a": np.ones((3, 4), np.float32) * i, "b": [np.int64(i), None]},
        "key": jax.random.key(i),
    }


def test_ids_are_portable_and_sort_by_iteration(mgr):
    ids = [mgr.create_checkpoint("run-1", it, state(it), {}) for it in (5, 100, 20)]
    assert ids == ["run-1-i000000000005", "run-1-i000000000100", "run-1-i000000000020"]
    assert sorted(ids) == [ids[0], ids[2], ids[1]]
    assert all(":" not in i and "/" not in i for i in ids)
    assert mgr.get_latest_checkpoint("run-1") == ids[1]
    assert [i.checkpoint_id for i in mgr.list_checkpoints()] == [ids[2], ids[1], ids[0]]  # newest first


@pytest.mark.parametrize(
    "bad",
    ["", ".", "..", "../x", "a/b", "/abs", "a\\b", "a\x00b", "a\nb", " lead", "x" * 129, ".hidden", "a b", 7, None],
)
def test_bad_run_ids_are_refused_before_writing(mgr, bad):
    with pytest.raises(InvalidRunIdError, match="run_id"):
        mgr.create_checkpoint(bad, 1, state(), {})
    assert os.listdir(mgr.store.root) == [] or set(os.listdir(mgr.store.root)) <= {".cfs-staging"}
    assert mgr.list_checkpoints() == []


def test_existing_checkpoint_is_never_replaced(mgr):
    cid = mgr.create_checkpoint("r", 1, state(1), {})
    with pytest.raises(CheckpointExistsError):
        mgr.create_checkpoint("r", 1, state(2), {})
    assert mgr.load_checkpoint(cid)["state"]["x"][0] == 1.0


def test_load_returns_everything(mgr):
    hist = {
        "iter": np.arange(4),
        "E": np.array([4.0, 3.0, 2.5, 2.0]),
        "grad_norm": np.array([1.0, 0.5, 0.2, 0.1]),
        "phase": ["RED", "AMBER", "GREEN", "GREEN"],
        "events": [{"type": "RUN_STARTED", "iter": 0, "payload": {"n": 1}}, {"type": "CHECKPOINT_CREATED", "iter": 3}],
    }
    cid = mgr.create_checkpoint(
        "r",
        3,
        state(3),
        {"lr": 0.1, "ops": ["blur"]},
        telemetry_history=hist,
        certificates={"eta_dd": 0.7, "gamma": float("inf")},
        metadata={"note": "hi"},
    )
    out = mgr.load_checkpoint(cid)
    assert out["run_id"] == "r" and out["iteration"] == 3 and out["checkpoint_id"] == cid
    assert out["flow_config"] == {"lr": 0.1, "ops": ["blur"]}
    assert out["certificates"] == {"eta_dd": 0.7, "gamma": "Infinity"}
    assert out["metadata"] == {"note": "hi"}
    assert out["created_at"].endswith("Z")
    s = out["telemetry_summary"]
    assert s["final_energy"] == 2.0 and s["energy_min"] == 2.0 and s["energy_max"] == 4.0
    assert s["final_grad_norm"] == 0.1 and s["phase_counts"] == {"RED": 1, "AMBER": 1, "GREEN": 2}
    assert s["total_iterations"] == 3 and s["samples"] == 4 and s["events"] == 2
    t = out["telemetry"]
    np.testing.assert_array_equal(t["E"], hist["E"])
    assert list(t["phase"]) == hist["phase"]
    assert t["events"][0] == {"type": "RUN_STARTED", "iter": 0, "payload": {"n": 1}}
    k = out["state"]["key"]
    assert jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(jax.random.key(3)))
    assert out["state"]["w"]["b"][1] is None and out["state"]["w"]["b"][0] == 3


def test_telemetry_as_list_of_dicts(mgr):
    hist = [{"iter": i, "E": 1.0 / (i + 1), "phase": "GREEN"} for i in range(5)]
    cid = mgr.create_checkpoint("r", 5, state(), {}, telemetry_history=hist)
    ds = mgr.open_checkpoint(cid).telemetry
    np.testing.assert_array_equal(ds["iter"].values, np.arange(5))
    assert ds["E"].values[-1] == pytest.approx(0.2)


def test_rollback_branches_a_new_run_with_lineage(mgr):
    a = mgr.create_checkpoint("main", 10, state(10), {"lr": 1})
    b = mgr.rollback_to_checkpoint(a, "branch")
    out = mgr.load_checkpoint(b)
    assert out["run_id"] == "branch" and out["iteration"] == 10
    assert out["lineage"] == {"rollback_from": a, "parent_run_id": "main", "parent_iteration": 10}
    np.testing.assert_array_equal(out["state"]["x"], state(10)["x"])
    assert mgr.delete_checkpoint(a)
    assert mgr.verify_checkpoint(b).ok  # deleting the source never damages the branch
    np.testing.assert_array_equal(mgr.load_checkpoint(b)["state"]["w"]["a"], state(10)["w"]["a"])
    with pytest.raises(CheckpointNotFoundError):
        mgr.rollback_to_checkpoint(a, "other")
    with pytest.raises(InvalidRunIdError):
        mgr.rollback_to_checkpoint(b, "../escape")


def test_delete_and_cleanup(mgr):
    ids = [mgr.create_checkpoint("r", i, state(i), {}) for i in range(8)]
    other = mgr.create_checkpoint("s", 1, state(), {})
    assert mgr.cleanup_old_checkpoints("r", keep_last=3) == 5
    assert sorted(i.checkpoint_id for i in mgr.list_checkpoints("r")) == ids[-3:]
    assert mgr.list_checkpoints("s")[0].checkpoint_id == other
    assert mgr.delete_checkpoint(ids[-1]) is True
    assert mgr.delete_checkpoint(ids[-1]) is False
    with pytest.raises(ValueError, match="keep_last"):
        mgr.cleanup_old_checkpoints("r", keep_last=0)
    assert not os.listdir(os.path.join(mgr.store.root, ".cfs-trash"))


def test_not_found_and_bad_ids(mgr):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        mgr.load_checkpoint("r-i000000000001")
    for bad in ["../etc", "/etc/passwd", "x", "", "r-i1"]:
        with pytest.raises(CheckpointNotFoundError, match="not a checkpoint id"):
            mgr.load_checkpoint(bad)
    assert mgr.get_latest_checkpoint("nobody") is None


def test_unsupported_leaves_and_metadata_name_the_path(mgr):
    with pytest.raises(UnsupportedLeafError, match=r"state\['a'\]\[1\]"):
        mgr.create_checkpoint("r", 1, {"a": [np.ones(2), object()]}, {})
    with pytest.raises(UnsupportedLeafError, match="dtype"):
        mgr.create_checkpoint("r", 1, {"s": np.array(["x"])}, {})
    with pytest.raises(MetadataError, match=r"flow_config\['op'\]"):
        mgr.create_checkpoint("r", 1, state(), {"op": object()})
    with pytest.raises(MetadataError, match="different lengths"):
        mgr.create_checkpoint("r", 1, state(), {}, telemetry_history={"iter": [1, 2], "E": [1.0]})
    assert mgr.list_checkpoints() == []
    staging = os.path.join(mgr.store.root, ".cfs-staging")
    assert not os.path.exists(staging) or os.listdir(staging) == []  # refused before anything was written


@dataclasses.dataclass
class Params:
    w: jax.Array
    b: jax.Array


jax.tree_util.register_dataclass(Params, data_fields=["w", "b"], meta_fields=[])


def test_target_restores_registered_nodes_and_shardings(mgr):
    import optax

    p = Params(jnp.arange(6.0).reshape(2, 3), jnp.zeros(3))
    opt = optax.adam(1e-3)
    tree = {"params": p, "opt": opt.init(p), "step": 7}
    cid = mgr.create_checkpoint("r", 1, tree, {})
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("d",))
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, tree
    )
    target["params"] = Params(
        jax.ShapeDtypeStruct((2, 3), jnp.float64, sharding=sh), jax.ShapeDtypeStruct((3,), jnp.float64)
    )
    out = mgr.load_checkpoint(cid, target=target)["state"]
    assert isinstance(out["params"], Params) and type(out["opt"]) is type(tree["opt"])
    assert out["params"].w.sharding == sh
    assert out["step"] == 7
    for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(tree)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # without a target, registered nodes come back as dicts of their children
    plain = mgr.load_checkpoint(cid)["state"]
    assert set(plain["params"]) == {"w", "b"}


def test_target_mismatch_names_leaf_expected_and_found(mgr):
    cid = mgr.create_checkpoint("r", 1, {"a": np.zeros((2, 3), np.float32), "b": np.ones(4)}, {})
    with pytest.raises(TargetMismatchError, match=r"state\['a'\].*expected shape \(3, 2\).*found shape \(2, 3\)"):
        mgr.load_checkpoint(cid, target={"a": jax.ShapeDtypeStruct((3, 2), np.float32), "b": np.ones(4)})
    with pytest.raises(TargetMismatchError, match=r"dtype float64.*found.*float32"):
        mgr.load_checkpoint(cid, target={"a": np.zeros((2, 3)), "b": np.ones(4)})
    with pytest.raises(TargetMismatchError, match=r"missing from checkpoint: \[\"state\['c'\]\"\]"):
        mgr.load_checkpoint(cid, target={"a": np.zeros((2, 3), np.float32), "b": np.ones(4), "c": np.ones(1)})
    with pytest.raises(TargetMismatchError, match="not in target"):
        mgr.load_checkpoint(cid, target={"a": np.zeros((2, 3), np.float32)})
    with pytest.raises(TargetMismatchError, match="PRNG key"):
        mgr.load_checkpoint(cid, target={"a": jax.random.key(0), "b": np.ones(4)})


def test_namedtuple_and_key_edge_cases(mgr):
    NT = collections.namedtuple("NT", ["alpha", "beta"])
    tree = {
        "": 1,
        ".": 2,
        "..": 3,
        "a/b": NT(np.ones(2), (None,)),
        "__z": 4.5,
        "A": 5,
        "a": 6,
        "k" * 300: 7,
        "ключ": np.int8(3),
        "%": float("nan"),
    }
    cid = mgr.create_checkpoint("r", 1, tree, {})
    out = mgr.load_checkpoint(cid)["state"]
    assert list(out) == list(tree)
    assert type(out["a/b"]).__name__ == "NT" and out["a/b"]._fields == ("alpha", "beta")
    assert out["ключ"] == np.int8(3) and type(out["ключ"]) is np.int8
    assert out["%"] != out["%"]
    for root, dirs, files in os.walk(mgr.checkpoint_path(cid)):
        for n in dirs + files:
            assert len(n.encode()) <= 255 and n not in (".", "..") and "/" not in n


def test_listing_skips_damaged_entries_with_a_warning(mgr):
    good = mgr.create_checkpoint("r", 1, state(), {})
    bad = mgr.create_checkpoint("r", 2, state(), {})
    with open(os.path.join(mgr.checkpoint_path(bad), "zarr.json"), "w") as f:
        f.write("{not json")
    os.mkdir(os.path.join(mgr.store.root, "stray-dir"))
    with pytest.warns(CheckpointWarning) as rec:
        infos = mgr.list_checkpoints()
    assert [i.checkpoint_id for i in infos] == [good]
    assert any(bad in str(w.message) for w in rec) and any("stray-dir" in str(w.message) for w in rec)


def test_stale_staging_from_dead_writer_is_removed_live_one_kept(tmp_path):
    import subprocess
    import sys

    store = tmp_path / "s"
    m = CheckpointManager(store)
    staging = store / ".cfs-staging"
    staging.mkdir(exist_ok=True)
    (staging / "dead.1.aa").mkdir()
    (staging / "dead.1.aa" / "junk").write_bytes(b"x")
    (staging / "dead.1.aa.lock").write_bytes(b"")
    # a live writer: another process holds its lock
    (staging / "live.2.bb").mkdir()
    lock = staging / "live.2.bb.lock"
    lock.write_bytes(b"")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl,sys,time;f=open(sys.argv[1]);"
            "fcntl.flock(f,fcntl.LOCK_EX);print('locked',flush=True);time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert m.store.cleanup_stale() == 1
        assert sorted(os.listdir(staging)) == ["live.2.bb", "live.2.bb.lock"]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert m.store.cleanup_stale() == 1
    assert os.listdir(staging) == []


def test_long_text_telemetry_and_tricky_names(mgr):
    n = 65536 + 3  # a text column with a partial last chunk (65539 = 3 * 21846 + 1: use 65538)
    n -= 1
    hist = {"iter": np.arange(n), "phase": ["GREEN", "RED", "AMBER"] * (n // 3)}
    cid = mgr.create_checkpoint(
        "r", 1, {"zarr.json": np.ones(2), "ZARR.JSON": 1, "c.0": np.zeros(1)}, {}, telemetry_history=hist
    )
    out = mgr.load_checkpoint(cid)
    assert list(out["telemetry"]["phase"][-3:]) == ["GREEN", "RED", "AMBER"]
    assert sorted(out["state"]) == sorted(["zarr.json", "ZARR.JSON", "c.0"])
    assert mgr.verify_checkpoint(cid).ok


@pytest.mark.parametrize("name", ["a\\b", "zarr.json", "__x", "event_x", "", "x/y", "é", "a b"])
def test_bad_telemetry_column_names_are_refused(mgr, name):
    with pytest.raises(MetadataError, match="telemetry column name"):
        mgr.create_checkpoint("r", 1, state(), {}, telemetry_history={"iter": [1], name: [1.0]})


def test_case_colliding_telemetry_columns_are_refused(mgr):
    with pytest.raises(MetadataError, match="equal up to case"):
        mgr.create_checkpoint("r", 1, state(), {}, telemetry_history={"E": [1.0], "e": [2.0]})


@pytest.mark.parametrize("field", ["flow_config", "certificates", "metadata"])
def test_attrs_must_be_objects(mgr, field):
    kwargs = {"flow_config": {}, field: [1, 2]}
    with pytest.raises(MetadataError, match=f"{field}: expected a dict"):
        mgr.create_checkpoint("r", 1, state(), **kwargs)
