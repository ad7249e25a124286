"""Importing Orbax checkpoints that Orbax itself writes in the test: a lone pytree, a
CheckpointManager directory of steps, a step with two items, through the API and ``cfs``."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from computable_flows_shim import CheckpointFormatError, CheckpointManager, import_orbax
from computable_flows_shim.cli._main import main

ocp = pytest.importorskip("orbax.checkpoint")


def model_state(seed: int) -> dict:
    """A small model-shaped state: bf16 params, f32 Adam moments, an int count, mixed nesting."""
    rng = np.random.default_rng(seed)
    params = {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((8, 4)), dtype=jnp.bfloat16), "bias": jnp.zeros(4)},
        "embed": jnp.asarray(rng.standard_normal((16, 8)), dtype=jnp.bfloat16),
    }
    moments = jax.tree_util.tree_map(lambda p: np.asarray(rng.standard_normal(p.shape), np.float32), params)
    return {
        "params": params,
        "opt": {"mu": moments, "nu": jax.tree_util.tree_map(np.square, moments), "count": np.int32(seed)},
        "q": np.arange(-4, 4).astype(ml_dtypes.int4),
        "layers": [np.arange(3, dtype=np.int64), np.ones((2, 2), np.float64)],
    }


def flat(tree) -> dict:
    """Key path -> (dtype, shape, bytes) of every leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(kp): (np.asarray(v).dtype, np.shape(v), np.asarray(v).tobytes()) for kp, v in leaves}


def assert_same(got, want) -> None:
    g, w = flat(got), flat(want)
    assert g.keys() == w.keys()
    for k in w:
        assert g[k] == w[k], k


def test_a_lone_pytree_and_a_manager_directory(tmp_path):
    single = str(tmp_path / "single")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(single, model_state(1))
    ckptr.wait_until_finished()
    om = ocp.CheckpointManager(str(tmp_path / "orbax"))
    for step in (10, 20, 30):
        om.save(step, args=ocp.args.StandardSave(model_state(step)))
    om.wait_until_finished()

    mgr = CheckpointManager(tmp_path / "store")
    assert import_orbax(mgr, single, "lone") == ["lone-i000000000000"]
    assert_same(mgr.load_checkpoint("lone-i000000000000")["state"], model_state(1))
    seen = []
    ids = import_orbax(mgr, tmp_path / "orbax", "run", progress=lambda d, t, c: seen.append((d, t, c)))
    assert ids == ["run-i000000000010", "run-i000000000020", "run-i000000000030"]
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    for step, cid in zip((10, 20, 30), ids):
        ck = mgr.load_checkpoint(cid)
        assert_same(ck["state"], model_state(step))
        assert ck["metadata"]["imported_from"] == {
            "format": "orbax",
            "path": str(tmp_path / "orbax" / str(step) / "default"),
        }
        assert mgr.verify_checkpoint(cid).ok
    # one step of it, under the step's own number
    assert import_orbax(mgr, tmp_path / "orbax" / "20", "one") == ["one-i000000000020"]
    assert import_orbax(mgr, tmp_path / "orbax", "picked", step=30) == ["picked-i000000000030"]


def test_a_step_with_two_items_becomes_a_dict_of_them(tmp_path):
    om = ocp.CheckpointManager(str(tmp_path / "orbax"), item_names=("state", "extra"))
    om.save(
        5,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(model_state(5)), extra=ocp.args.StandardSave({"x": np.arange(4.0)})
        ),
    )
    om.wait_until_finished()
    mgr = CheckpointManager(tmp_path / "store")
    (cid,) = import_orbax(mgr, tmp_path / "orbax", "two")
    got = mgr.load_checkpoint(cid)["state"]
    assert set(got) == {"state", "extra"}
    assert_same(got["state"], model_state(5))
    assert got["extra"]["x"].tobytes() == np.arange(4.0).tobytes()


def test_not_an_orbax_directory_is_refused_and_nothing_is_saved(tmp_path):
    (tmp_path / "empty").mkdir()
    mgr = CheckpointManager(tmp_path / "store")
    with pytest.raises(CheckpointFormatError, match="no Orbax checkpoint here"):
        import_orbax(mgr, tmp_path / "empty", "r")
    with pytest.raises(CheckpointFormatError, match="not a directory"):
        import_orbax(mgr, tmp_path / "missing", "r")
    assert mgr.list_checkpoints() == []


def test_cfs_import_orbax(tmp_path, capsys):
    om = ocp.CheckpointManager(str(tmp_path / "orbax"))
    for step in (1, 2):
        om.save(step, args=ocp.args.StandardSave(model_state(step)))
    om.wait_until_finished()
    root = str(tmp_path / "store")
    assert main(["import-orbax", str(tmp_path / "orbax"), "--run-id", "imp", "--store", root]) == 0
    assert capsys.readouterr().out.split() == ["imp-i000000000001", "imp-i000000000002"]
    assert_same(CheckpointManager(root).load_checkpoint("imp-i000000000002")["state"], model_state(2))
    assert main(["import-orbax", str(tmp_path), "--run-id", "x", "--store", root]) == 2
    assert "no Orbax checkpoint here" in capsys.readouterr().err
    assert os.path.isdir(root)
