"""Damaged checkpoints: every kind of damage is detected by load and by verify, naming leaf and chunk."""

import json
import os
import re

import forge
import numpy as np
import pytest

from computable_flows_shim import CheckpointCorruptError, CheckpointError, CheckpointFormatError, CheckpointManager

BIG = np.arange(3 * 1024 * 1024, dtype=np.float32).reshape(3, 1024, 1024)  # 12 MiB: 3 chunks


@pytest.fixture
def saved(tmp_path):
    # every leaf its own array: its files are what these tests damage
    mgr = CheckpointManager(tmp_path / "store", pack_max_bytes=0)
    cid = mgr.create_checkpoint("r", 1, {"big": BIG, "small": {"v": np.arange(5)}}, {})
    return mgr, cid, mgr.checkpoint_path(cid)


def chunk(path, leaf="big", key="c.1.0.0"):
    return os.path.join(path, "state", *leaf.split("/"), key)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def dump_json(doc, path):
    """Write a crafted zarr.json as a hostile writer would: with the checkpoint's metadata
    checksums recomputed (tests/forge.py), so the check under test is what refuses it."""
    with open(path, "w") as f:
        json.dump(doc, f)
    ckpt = os.path.dirname(path)
    while not re.search(r"-i[0-9]{12}$", ckpt):
        ckpt = os.path.dirname(ckpt)
    forge.resign(ckpt)


def expect_damage(mgr, cid, *patterns):
    with pytest.raises(CheckpointError) as e:
        mgr.load_checkpoint(cid)
    for p in patterns:
        assert p in str(e.value), str(e.value)
    report = mgr.verify_checkpoint(cid)
    assert not report.ok
    assert any(all(p in line for p in patterns) for line in report.problems), report.problems
    return e.value


def test_intact_checkpoint_verifies(saved):
    mgr, cid, _ = saved
    assert mgr.verify_checkpoint(cid).ok
    assert sorted(os.listdir(os.path.join(saved[2], "state", "big"))) == ["c.0.0.0", "c.1.0.0", "c.2.0.0", "zarr.json"]


@pytest.mark.parametrize("offset", [0, 1000, 4 * 1024 * 1024 - 1, 4 * 1024 * 1024 + 2])
def test_bit_flip_in_chunk(saved, offset):
    mgr, cid, path = saved
    with open(chunk(path), "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))
    err = expect_damage(mgr, cid, "state['big']", "'c.1.0.0'")
    assert isinstance(err, CheckpointCorruptError)


def test_missing_chunk(saved):
    mgr, cid, path = saved
    os.unlink(chunk(path))
    expect_damage(mgr, cid, "state['big']", "'c.1.0.0'", "missing")


def test_truncated_chunk(saved):
    mgr, cid, path = saved
    os.truncate(chunk(path), 100)
    expect_damage(mgr, cid, "state['big']", "'c.1.0.0'", "100 bytes")


def test_swapped_chunks(saved):
    mgr, cid, path = saved
    a, b = chunk(path, key="c.0.0.0"), chunk(path, key="c.2.0.0")
    os.rename(a, a + ".tmp")
    os.rename(b, a)
    os.rename(a + ".tmp", b)
    expect_damage(mgr, cid, "state['big']", "manifest")


def test_truncated_metadata(saved):
    mgr, cid, path = saved
    meta = os.path.join(path, "state", "small", "v", "zarr.json")
    with open(meta, "r+b") as f:
        f.truncate(40)
    expect_damage(mgr, cid, "state['small']['v']", "unreadable metadata")


def test_truncated_root_metadata_is_named(saved):
    mgr, cid, path = saved
    os.truncate(os.path.join(path, "zarr.json"), 10)
    with pytest.raises(CheckpointCorruptError, match="unreadable metadata"):
        mgr.load_checkpoint(cid)


def test_extra_file_is_reported_by_verify(saved):
    mgr, cid, path = saved
    with open(os.path.join(path, "state", "big", "c.9.0.0"), "wb") as f:
        f.write(b"x")
    report = mgr.verify_checkpoint(cid)
    assert any("unexpected file" in p and "c.9.0.0" in p for p in report.problems)


def test_symlinked_chunk_is_refused(saved, tmp_path):
    mgr, cid, path = saved
    outside = tmp_path / "outside"
    with open(chunk(path), "rb") as f:
        outside.write_bytes(f.read())
    os.unlink(chunk(path))
    os.symlink(outside, chunk(path))
    expect_damage(mgr, cid, "symlink")


def test_path_traversal_in_pytree_is_refused(saved):
    mgr, cid, path = saved
    root = os.path.join(path, "zarr.json")
    doc = load_json(root)
    doc["attributes"]["pytree"]["children"][0]["path"] = "../../../etc"
    dump_json(doc, root)
    with pytest.raises(CheckpointFormatError, match="unsafe path"):
        mgr.load_checkpoint(cid)


def test_changed_data_type_or_codec_is_refused(saved):
    mgr, cid, path = saved
    meta = os.path.join(path, "state", "small", "v", "zarr.json")
    doc = load_json(meta)
    doc["codecs"] = [{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 1}}]
    dump_json(doc, meta)
    with pytest.raises(CheckpointFormatError, match="unsupported codecs"):
        mgr.load_checkpoint(cid)
    doc["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    doc["data_type"] = "object"
    dump_json(doc, meta)
    with pytest.raises(CheckpointFormatError, match="unsupported data_type 'object'"):
        mgr.load_checkpoint(cid)


def test_newer_format_version_is_refused(saved):
    mgr, cid, path = saved
    root = os.path.join(path, "zarr.json")
    doc = load_json(root)
    doc["attributes"]["format_version"] = 99
    dump_json(doc, root)
    with pytest.raises(CheckpointFormatError, match="newer"):
        mgr.load_checkpoint(cid)


def test_lazy_read_detects_damage_in_touched_chunk_only(saved):
    mgr, cid, path = saved
    os.unlink(chunk(path, key="c.2.0.0"))
    big = mgr.open_checkpoint(cid).state["big"]
    np.testing.assert_array_equal(big[0, :4, :4], BIG[0, :4, :4])
    assert big.chunks_read == 1
    with pytest.raises(CheckpointCorruptError, match="c.2.0.0"):
        big[2, 0, 0]
