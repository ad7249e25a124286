"""Async saves, incremental saves, bounded telemetry cost, lazy partial reads (behaviour;
the speed figures themselves come from benchmarks/)."""

import os
import sys

import numpy as np
import pytest

from computable_flows_shim import CheckpointExistsError, CheckpointManager

MiB = 1 << 20


def test_async_save_returns_a_snapshot_and_commits_later(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    x = np.arange(8 * MiB // 8, dtype=np.float64)
    cid = mgr.create_checkpoint("r", 1, {"x": x}, {}, blocking=False)
    x[:] = -1  # the caller may change its state at once: the save holds a snapshot
    mgr.wait_until_finished()
    assert mgr.load_checkpoint(cid)["state"]["x"][5] == 5.0
    mgr.close()


def test_at_most_one_save_in_flight(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    big = {"x": np.ones(16 * MiB // 8)}
    a = mgr.create_checkpoint("r", 1, big, {}, blocking=False)
    b = mgr.create_checkpoint("r", 2, big, {}, blocking=False)
    assert mgr.store.exists(a)  # the second save started only after the first committed
    mgr.wait_until_finished()
    assert mgr.store.exists(b)


def test_background_failure_surfaces_on_the_next_save_and_on_close(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    cid = mgr.create_checkpoint("r", 1, {"x": np.ones(32 * MiB // 8)}, {}, blocking=False)
    os.mkdir(mgr.store.path(cid))  # another writer claims the id while ours is in flight
    open(os.path.join(mgr.store.path(cid), "zarr.json"), "w").close()
    with pytest.raises(CheckpointExistsError, match=cid):
        mgr.create_checkpoint("r", 2, {"x": np.ones(3)}, {})
    cid3 = mgr.create_checkpoint("r", 3, {"x": np.ones(32 * MiB // 8)}, {}, blocking=False)
    os.mkdir(mgr.store.path(cid3))
    open(os.path.join(mgr.store.path(cid3), "zarr.json"), "w").close()
    with pytest.raises(CheckpointExistsError, match=cid3):
        mgr.close()
    # Nothing is left behind.  Where the claim came before the saver thread looked, the save
    # was refused before it staged anything, and the staging directory was never made.
    staging = os.path.join(mgr.store.root, ".cfs-staging")
    assert not os.path.isdir(staging) or not os.listdir(staging)
    assert set(os.listdir(mgr.store.root)) - {".cfs-staging"} == {cid, cid3}  # only the two claims


def test_incremental_save_links_unchanged_leaves(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    rng = np.random.default_rng(0)
    state = {f"leaf{i}": rng.standard_normal(MiB // 8) for i in range(10)}  # 10 x 1 MiB
    first = mgr.create_checkpoint("r", 1, state, {})
    full = mgr.last_save_stats.bytes_written
    state["leaf3"] = state["leaf3"] + 1.0  # 10% of the state changes
    second = mgr.create_checkpoint("r", 2, state, {})
    stats = mgr.last_save_stats
    assert stats.bytes_written <= 0.15 * full, (stats, full)
    assert stats.chunks_linked == 9
    assert mgr.delete_checkpoint(first)  # every checkpoint stays self-contained
    assert mgr.verify_checkpoint(second).ok
    out = mgr.load_checkpoint(second)["state"]
    assert all(out[k].tobytes() == v.tobytes() for k, v in state.items())


def _crc_collision(n: int) -> bytes:
    """A nonzero n-byte message with the CRC32C of n zero bytes (CRC is affine over GF(2):
    any nonzero vector in the kernel of its linear part will do; Gaussian elimination)."""
    import crc32c

    zero = crc32c.crc32c(bytes(n))
    rows = []  # (crc image, message bitmask) of each single-bit message
    for bit in range(8 * n):
        m = bytearray(n)
        m[bit // 8] = 1 << (bit % 8)
        rows.append((crc32c.crc32c(bytes(m)) ^ zero, 1 << bit))
    pivots: dict[int, tuple[int, int]] = {}
    for img, mask in rows:
        for b in range(31, -1, -1):
            if not img >> b & 1:
                continue
            if b not in pivots:
                pivots[b] = (img, mask)
                break
            img, mask = img ^ pivots[b][0], mask ^ pivots[b][1]
        if img == 0:
            return mask.to_bytes(n, "little")
    raise AssertionError("no collision found")


def test_a_changed_chunk_with_the_same_crc_is_still_written(tmp_path):
    """Linking needs identical bytes, not just an equal CRC32C (collisions exist)."""
    import crc32c

    mgr = CheckpointManager(tmp_path / "s", pack_max_bytes=0)
    base = np.zeros(16, np.uint8)
    changed = np.frombuffer(_crc_collision(16), np.uint8)
    assert changed.any() and crc32c.crc32c(changed.tobytes()) == crc32c.crc32c(base.tobytes())
    mgr.create_checkpoint("r", 1, {"a": base}, {})
    mgr.create_checkpoint("r", 2, {"a": changed}, {})
    assert mgr.load_checkpoint("r-i000000000002")["state"]["a"].tobytes() == changed.tobytes()
    mgr.create_checkpoint("r", 3, {"a": changed}, {})  # and a truly identical chunk is linked
    assert mgr.load_checkpoint("r-i000000000003")["state"]["a"].tobytes() == changed.tobytes()
    st = os.stat(os.path.join(mgr.checkpoint_path("r-i000000000003"), "state", "a", "c.0"))
    assert st.st_nlink == 2


def test_telemetry_cost_does_not_grow_with_history(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    n = 300_000
    hist = {"iter": np.arange(n), "E": np.linspace(1, 0, n), "phase": ["GREEN"] * n}
    mgr.create_checkpoint("r", n, {"x": np.ones(4)}, {}, telemetry_history=hist)
    first = mgr.last_save_stats.bytes_written
    for k in range(1, 4):
        m = n + 100 * k
        hist = {"iter": np.arange(m), "E": np.linspace(1, 0, m), "phase": ["GREEN"] * m}
        hist["E"][:n] = np.linspace(1, 0, n)  # the old samples are unchanged
        mgr.create_checkpoint("r", m, {"x": np.ones(4)}, {}, telemetry_history=hist)
        # only the last (partial) 65536-sample chunk of each column is written again
        assert mgr.last_save_stats.bytes_written < 0.35 * first, (k, mgr.last_save_stats, first)


_OPENED: list[str] = []


def _audit(event, args):
    if event == "open" and isinstance(args[0], str) and "/state/" in args[0]:
        _OPENED.append(args[0])


sys.addaudithook(_audit)


def test_lazy_slice_opens_only_the_chunks_it_touches(tmp_path):
    mgr = CheckpointManager(tmp_path / "s")
    a = np.arange(64 * MiB // 4, dtype=np.float32).reshape(4096, 4096)  # 64 MiB: 16 chunks of 256 rows
    cid = mgr.create_checkpoint("r", 1, {"a": a}, {})
    view = mgr.open_checkpoint(cid).state["a"]
    assert view.chunk_shape == (256, 4096)
    _OPENED.clear()
    got = view[800:864, :]  # 1 MiB of rows, inside chunk 3 (rows 768-1023)
    assert got.tobytes() == a[800:864, :].tobytes()
    chunks = [p for p in _OPENED if os.path.basename(p).startswith("c.")]
    assert [os.path.basename(p) for p in chunks] == ["c.3.0"]
    _OPENED.clear()
    view[250:260, 7]  # straddles two chunks
    assert sorted(os.path.basename(p) for p in _OPENED if "/c." in p) == ["c.0.0", "c.1.0"]


def test_restored_arrays_are_aligned_and_jax_adopts_them_on_the_cpu(tmp_path):
    """Restored buffers start on a 64-byte boundary, so that JAX on the CPU takes them as
    they are (no second copy of the state): the JAX array's buffer is the restored one."""
    import jax
    import ml_dtypes

    mgr = CheckpointManager(tmp_path / "s")
    rng = np.random.default_rng(0)
    state = {
        "w": rng.standard_normal((300, 77)).astype(np.float32),  # odd sizes: no accidental alignment
        "b": rng.standard_normal(1001).astype(ml_dtypes.bfloat16),
        "n": np.arange(13, dtype=np.int8),
    }
    cid = mgr.create_checkpoint("r", 1, state, {})
    got = mgr.load_checkpoint(cid)["state"]
    for k, v in state.items():
        assert got[k].ctypes.data % 64 == 0, k
        assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), k
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in state.items()}
    restored = mgr.load_checkpoint(cid, target=target)["state"]
    for k, v in state.items():
        assert isinstance(restored[k], jax.Array), k
        assert np.asarray(restored[k]).tobytes() == v.tobytes(), k
        if jax.default_backend() == "cpu":
            assert restored[k].unsafe_buffer_pointer() % 64 == 0, k
