"""Packed small leaves (format v3, spec/FORMAT.md 8.2): what the writer puts where, what the
readers give back, incremental links of packs, async snapshots, chunk-spanning leaves."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest

from computable_flows_shim import CheckpointManager


def root_attrs(ckpt: str) -> dict:
    with open(os.path.join(ckpt, "zarr.json")) as f:
        return json.load(f)["attributes"]


def nodes(ckpt: str) -> dict:
    tree = root_attrs(ckpt)["pytree"]
    return dict(zip(tree["keys"], tree["children"]))


STATE = {
    "a": np.arange(5, dtype=np.float32),  # 20 B: the next float32 leaf starts at byte 64
    "b": np.arange(7, dtype=np.float32).reshape(7, 1),
    "s": np.float32(2.5),  # a 0-d numpy scalar
    "h": np.ones(3, ml_dtypes.bfloat16),
    "i": np.arange(4, dtype=np.int8),
    "big": np.arange(20_000, dtype=np.float32),  # 80,000 B: above 64 KiB, its own array
}


def test_small_leaves_go_into_one_aligned_pack_per_dtype(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    ckpt = mgr.checkpoint_path(mgr.create_checkpoint("r", 1, STATE))
    assert root_attrs(ckpt)["format_version"] == 3
    assert sorted(os.listdir(os.path.join(ckpt, "packed"))) == ["bfloat16", "float32", "int8", "zarr.json"]
    assert sorted(os.listdir(os.path.join(ckpt, "state"))) == ["big", "zarr.json"]
    n = nodes(ckpt)
    offsets = {k: n[k]["packed"]["offset"] for k in ("a", "b", "s")}
    assert offsets == {"a": 0, "b": 16, "s": 32}  # float32 elements: bytes 0, 64, 128
    assert all(n[k]["packed"]["array"] == "float32" for k in offsets) and "packed" not in n["big"]
    with open(os.path.join(ckpt, "packed", "float32", "c.0"), "rb") as f:
        raw = np.frombuffer(f.read()[:-4], np.float32)  # the chunk less its CRC32C trailer
    np.testing.assert_array_equal(raw[0:5], STATE["a"])
    assert not raw[5:16].any() and not raw[23:32].any()  # zeros between leaves
    np.testing.assert_array_equal(raw[16:23], STATE["b"].reshape(-1))

    out = mgr.load_checkpoint(mgr.list_checkpoints()[0].checkpoint_id)["state"]
    for k, v in STATE.items():
        assert np.asarray(out[k]).dtype == np.asarray(v).dtype and np.asarray(out[k]).tobytes() == v.tobytes(), k
    assert isinstance(out["s"], np.float32)
    for k in ("a", "b", "h", "i", "big"):
        assert out[k].ctypes.data % 64 == 0, k  # every packed leaf aligned, not only the first of its pack
    # the float32 leaves are views of one buffer: the pack was read once
    assert np.shares_memory(out["a"].base, out["b"]) or out["a"].base is out["b"].base


def test_pack_max_bytes_zero_writes_format_v1(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", pack_max_bytes=0)
    ckpt = mgr.checkpoint_path(mgr.create_checkpoint("r", 1, STATE))
    assert root_attrs(ckpt)["format_version"] == 1 and not os.path.exists(os.path.join(ckpt, "packed"))
    assert all("packed" not in node for node in nodes(ckpt).values())


@pytest.mark.parametrize("bad", [-1, True, 1.5, "64k", None])
def test_bad_pack_max_bytes_is_refused_before_the_store_is_touched(tmp_path, bad):
    with pytest.raises(ValueError, match="pack_max_bytes"):
        CheckpointManager(tmp_path / "s", pack_max_bytes=bad)
    assert not os.path.exists(tmp_path / "s")


def test_unchanged_packs_are_linked_and_a_changed_leaf_rewrites_its_pack(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    first = mgr.checkpoint_path(mgr.create_checkpoint("r", 1, STATE))
    second = mgr.checkpoint_path(mgr.create_checkpoint("r", 2, STATE))
    for pack in ("float32", "bfloat16", "int8"):
        a, b = (os.stat(os.path.join(p, "packed", pack, "c.0")) for p in (first, second))
        assert (a.st_ino, a.st_nlink) == (b.st_ino, 2), pack
    third = mgr.checkpoint_path(mgr.create_checkpoint("r", 3, {**STATE, "b": STATE["b"] + 1}))
    assert os.stat(os.path.join(third, "packed", "float32", "c.0")).st_ino != b.st_ino
    assert os.stat(os.path.join(third, "packed", "int8", "c.0")).st_nlink == 3  # untouched pack still linked
    np.testing.assert_array_equal(mgr.load_checkpoint("r-i000000000003")["state"]["b"], STATE["b"] + 1)


def test_an_async_save_keeps_the_state_as_it_was_when_called(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    state = {f"w{i}": np.full(1000, i, np.float32) for i in range(50)}
    cid = mgr.create_checkpoint("r", 1, state, blocking=False)
    for v in state.values():
        v[:] = -1  # changed at once, while the save may still be writing
    mgr.wait_until_finished()
    out = mgr.load_checkpoint(cid)["state"]
    assert all((out[f"w{i}"] == i).all() for i in range(50))


def test_a_leaf_across_two_pack_chunks_loads_slices_and_verifies(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    rng = np.random.default_rng(0)
    # 81 x 60,000 B: two chunks of 607,320 elements, leaf 40 across the boundary
    state = {f"w{i:02d}": rng.standard_normal(15_000).astype(np.float32) for i in range(81)}
    cid = mgr.create_checkpoint("r", 1, state)
    ckpt = mgr.checkpoint_path(cid)
    with open(os.path.join(ckpt, "packed", "float32", "zarr.json")) as f:
        meta = json.load(f)
    (length,), (chunk,) = meta["shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
    assert length * 4 > 4 << 20 and chunk == -(-length // 2)  # two equal chunks, not 4 MiB + a small one
    view = mgr.open_checkpoint(cid)
    spanning = [
        s for _, _, s in view.leaves() if s.offset // chunk != (s.offset + s.size - 1) // chunk  # type: ignore[union-attr]
    ]
    assert len(spanning) == 1 and len(spanning[0].pack_chunks()) == 2
    name = next(k for k, n in nodes(ckpt).items() if n["packed"]["offset"] == spanning[0].offset)
    np.testing.assert_array_equal(view.state[name][14_990:], state[name][14_990:])
    assert mgr.verify_checkpoint(cid).ok
    out = mgr.load_checkpoint(cid, target=jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state))
    assert all(np.asarray(out["state"][k]).tobytes() == v.tobytes() for k, v in state.items())


def test_compressed_and_prng_leaves(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    state = {"k": jax.random.key(7), "z": np.zeros(1000, np.float32), "n": np.arange(3.0)}
    cid = mgr.create_checkpoint("r", 1, state, compression=lambda path, a: "zstd" if path == "z" else None)
    n = nodes(mgr.checkpoint_path(cid))
    assert "packed" not in n["z"]  # a leaf given a codec keeps its own (compressed) array
    assert n["k"]["packed"]["array"] == "uint32" and n["k"]["packed"]["cfs_prng_key_impl"] == "threefry2x32"
    key = mgr.load_checkpoint(cid)["state"]["k"]
    assert jax.random.key_impl(key) == jax.random.key_impl(state["k"])
    assert (jax.random.key_data(key) == jax.random.key_data(state["k"])).all()


def test_show_and_describe_name_a_packed_leaf_by_its_pack_and_range(tmp_path, capsys):
    from computable_flows_shim.cli._main import main

    mgr = CheckpointManager(tmp_path / "s")
    cid = mgr.create_checkpoint("r", 1, STATE)
    info = {i.path: i.to_dict() for i in mgr.open_checkpoint(cid).describe_leaves()}
    assert info["b"]["path"] == "packed/float32[16:23]" and info["b"]["packed"] is True
    assert info["big"]["path"] == "state/big" and "packed" not in info["big"]
    assert "packed/float32[16:23]" in repr(mgr.open_checkpoint(cid))
    assert main(["--root", str(tmp_path / "s"), "show", cid]) == 0
    assert "packed/bfloat16[0:3]" in capsys.readouterr().out
