"""Compressed checkpoints (format version 2, spec/FORMAT.md section 8.1): zstd and blosc
between ``bytes`` and ``crc32c``, bit-exact round trips, the CRC32C manifest over the stored
bytes, incremental links, lazy reads, hostile chunks refused before they decompress, the
switch-off rule, the option's checks.  zarr-python and tensorstore decoding them without the
library: tests/test_interop.py; the reference reader: tests/test_reference_reader.py; the
golden v2 checkpoint: tests/test_golden.py."""

import itertools
import json
import os
import tempfile

import crc32c
import jax
import jax.numpy as jnp
import ml_dtypes
import numcodecs
import numpy as np
import pytest
from forge import edit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from strategies import arrays, assert_lazy_slices_match, assert_tree_equal, pytrees

from computable_flows_shim import (
    CheckpointCorruptError,
    CheckpointManager,
    Compression,
    export_checkpoint,
)

rng = np.random.default_rng(0)
STATE = {
    "sparse": np.where(rng.random((1100, 1024)) < 0.01, 1.0, 0.0).astype(np.float32),  # 2 chunks, 1 edge
    "f64": np.linspace(-1.0, 1.0, 3000),
    "bf16": jnp.asarray(np.repeat(rng.standard_normal(256), 8), dtype=jnp.bfloat16),
    "f8": np.repeat(np.arange(16), 8).astype(ml_dtypes.float8_e4m3fn),
    "i4": np.tile(np.arange(-8, 8), 20).astype(ml_dtypes.int4),
    "c64": (np.arange(500) * (1 - 2j)).astype(np.complex64),
    "u16": np.arange(5000, dtype=np.uint16).reshape(50, 100),
    "bools": np.arange(777) % 5 == 0,
    "scalar": np.float32(3.5),
    "opt": {"mu": np.zeros((64, 64), np.float32), "nu": np.full((64, 64), 1e-8, np.float32)},
    "py": [1, 2.5, None],
}
CODECS = {
    "zstd": "zstd",
    "blosc": "blosc",
    "lz4-noshuffle": Compression("blosc", cname="lz4", shuffle=False, level=1),
    "zstd-19": {"codec": "zstd", "level": 19},
}


def leaves(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}/")
        elif isinstance(v, list):
            continue
        else:
            yield f"{prefix}{k}", np.asarray(v)


def assert_bit_exact(expected, got):
    for path, e in leaves(expected):
        g = np.asarray(dict(leaves(got))[path])
        assert g.dtype == e.dtype and g.shape == e.shape, (path, g.dtype, g.shape)
        assert g.tobytes() == e.tobytes(), path


def codecs_of(ckpt, leaf):
    with open(os.path.join(ckpt, "state", leaf, "zarr.json")) as f:
        return [c["name"] for c in json.load(f)["codecs"]]


def root_attrs(ckpt):
    with open(os.path.join(ckpt, "zarr.json")) as f:
        return json.load(f)["attributes"]


def chunk_path(ckpt, leaf, key):
    return os.path.join(ckpt, "state", leaf, key)


@pytest.fixture
def fast(tmp_path):
    return CheckpointManager(tmp_path / "store", durable=False)


@pytest.mark.parametrize("compression", list(CODECS.values()), ids=list(CODECS))
def test_round_trip_is_bit_exact(fast, compression):
    cid = fast.create_checkpoint("r", 1, STATE, compression=compression)
    ckpt = fast.checkpoint_path(cid)
    name = "zstd" if compression in ("zstd",) or isinstance(compression, dict) else "blosc"
    assert codecs_of(ckpt, "sparse") == ["bytes", name, "crc32c"]
    assert codecs_of(ckpt, "scalar") == ["bytes", "crc32c"]  # 4 bytes never shrink
    assert root_attrs(ckpt)["format_version"] == 2
    out = fast.load_checkpoint(cid)
    assert_bit_exact(STATE, out["state"])
    assert out["state"]["py"] == [1, 2.5, None]
    assert fast.verify_checkpoint(cid).ok
    # into a target's types (JAX arrays), and the async path
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") else a, STATE)
    assert_bit_exact(STATE, fast.load_checkpoint(cid, target=target)["state"])
    fast.create_checkpoint("r", 2, STATE, compression=compression, blocking=False)
    fast.wait_until_finished()
    assert_bit_exact(STATE, fast.load_checkpoint("r-i000000000002")["state"])


def test_stored_bytes_are_smaller_and_the_manifest_is_their_crc(fast):
    cid = fast.create_checkpoint("r", 1, STATE, compression="zstd")
    ckpt = fast.checkpoint_path(cid)
    with open(os.path.join(ckpt, "state", "sparse", "zarr.json")) as f:
        manifest = json.load(f)["attributes"]["cfs_chunk_crc32c"]
    for i, key in enumerate(["c.0.0", "c.1.0"]):
        with open(chunk_path(ckpt, "sparse", key), "rb") as f:
            raw = f.read()
        assert len(raw) < (4 << 20) // 50  # 4 MiB of 1 % ones: far smaller
        assert crc32c.crc32c(raw[:-4]) == int.from_bytes(raw[-4:], "little") == manifest[i]
        assert numcodecs.Zstd().decode(raw[:-4])[:8]  # a plain zstd frame under the trailer


def test_a_flipped_byte_in_a_compressed_chunk_is_damage(fast):
    cid = fast.create_checkpoint("r", 1, STATE, compression="blosc")
    path = chunk_path(fast.checkpoint_path(cid), "sparse", "c.1.0")
    with open(path, "r+b") as f:
        f.seek(40)
        b = f.read(1)
        f.seek(40)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(CheckpointCorruptError, match=r"sparse.*c\.1\.0.*checksum"):
        fast.load_checkpoint(cid)
    lazy = fast.open_checkpoint(cid).state["sparse"]
    np.testing.assert_array_equal(lazy[:10, :10], STATE["sparse"][:10, :10])  # chunk 0 is intact
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        lazy[1090:, :5]
    problems = fast.verify_checkpoint(cid).problems
    assert len(problems) == 1 and "c.1.0" in problems[0]


def test_an_incremental_save_links_unchanged_compressed_chunks(fast):
    fast.create_checkpoint("r", 1, STATE, compression="zstd")
    first = fast.checkpoint_path("r-i000000000001")
    changed = {**STATE, "f64": STATE["f64"] + 1.0}
    fast.create_checkpoint("r", 2, changed, compression="zstd")
    stats = fast.last_save_stats
    second = fast.checkpoint_path("r-i000000000002")
    assert stats.chunks_linked >= 10 and stats.chunks_written >= 1
    for leaf, key in [("sparse", "c.0.0"), ("sparse", "c.1.0"), ("opt/mu", "c.0.0")]:
        assert os.stat(chunk_path(first, leaf, key)).st_ino == os.stat(chunk_path(second, leaf, key)).st_ino
    assert os.stat(chunk_path(first, "f64", "c.0")).st_ino != os.stat(chunk_path(second, "f64", "c.0")).st_ino
    assert_bit_exact(changed, fast.load_checkpoint("r-i000000000002")["state"])
    # another codec: the bytes differ, nothing is linked across codecs
    fast.create_checkpoint("r", 3, changed, compression="blosc")
    assert (
        os.stat(chunk_path(second, "sparse", "c.0.0")).st_ino
        != os.stat(chunk_path(fast.checkpoint_path("r-i000000000003"), "sparse", "c.0.0")).st_ino
    )


def test_lazy_slices_and_dask_read_only_the_chunks_they_touch(fast):
    cid = fast.create_checkpoint("r", 1, STATE, compression="zstd")
    lazy = fast.open_checkpoint(cid).state["sparse"]
    np.testing.assert_array_equal(lazy[1050:1099:3, 7], STATE["sparse"][1050:1099:3, 7])
    assert lazy.chunks_read == 1
    np.testing.assert_array_equal(lazy[1020:1030, 2:5], STATE["sparse"][1020:1030, 2:5])  # across the boundary
    assert lazy.chunks_read == 3
    assert float(lazy.to_dask().sum().compute()) == float(STATE["sparse"].sum())
    ds = fast.open_checkpoint(cid).to_xarray()
    assert ds["opt/nu"].values.tobytes() == STATE["opt"]["nu"].tobytes()


def _replace_chunk(ckpt, leaf, key, body, index=0):
    """A chunk with a valid trailer, manifest entry and metadata checksums: only the decoder's
    size checks can refuse it (a hostile writer that knows the format)."""
    crc = crc32c.crc32c(body)
    with open(chunk_path(ckpt, leaf, key), "wb") as f:
        f.write(body + crc.to_bytes(4, "little"))
    edit(ckpt, f"state/{leaf}", lambda d: d["attributes"]["cfs_chunk_crc32c"].__setitem__(index, crc))


@pytest.mark.parametrize(
    "codec, body, message",
    [
        ("zstd", lambda n: numcodecs.Zstd(level=19).encode(bytes(64 << 20)), "decodes to 67108864 bytes"),  # a bomb
        ("zstd", lambda n: numcodecs.Zstd().encode(bytes(n // 2)), f"decodes to {3000 * 8 // 2} bytes"),
        ("zstd", lambda n: b"\x28\xb5\x2f\xfd" + bytes(40), "not a zstd frame that states its size"),
        ("zstd", lambda n: bytes(100), "not a zstd frame"),
        ("blosc", lambda n: numcodecs.Blosc("zstd", 5, 1, typesize=8).encode(bytes(n * 4)), "decodes to 96000"),
        ("blosc", lambda n: numcodecs.Blosc("lz4", 5, 1, typesize=8).encode(bytes(n))[:-3], "blosc header says"),
        ("blosc", lambda n: bytes(8), "shorter than its header"),
        ("zstd", lambda n: bytes(n + n // 128 + 2000), "compressed chunk file has"),  # larger than any encoding
    ],
    ids=["zstd-bomb", "zstd-short", "zstd-no-size", "not-zstd", "blosc-bomb", "blosc-cut", "blosc-short", "too-big"],
)
def test_a_hostile_chunk_is_refused_before_it_decompresses(fast, codec, body, message):
    cid = fast.create_checkpoint("r", 1, {"f64": STATE["f64"]}, compression=codec)
    ckpt = fast.checkpoint_path(cid)
    assert codecs_of(ckpt, "f64") == ["bytes", codec, "crc32c"]
    _replace_chunk(ckpt, "f64", "c.0", body(3000 * 8))
    with pytest.raises(CheckpointCorruptError, match=message):
        fast.load_checkpoint(cid)
    with pytest.raises(CheckpointCorruptError, match=message):
        fast.open_checkpoint(cid).state["f64"][5:10]
    assert message.split()[0] in " ".join(fast.verify_checkpoint(cid).problems)


def test_a_compressed_array_in_a_text_column_or_with_a_bad_configuration_is_refused(fast):
    from computable_flows_shim import CheckpointFormatError

    cid = fast.create_checkpoint("r", 1, {"f64": STATE["f64"]}, compression="zstd")
    ckpt = fast.checkpoint_path(cid)
    edit(ckpt, "state/f64", lambda d: d["codecs"][1]["configuration"].update(level="high"))
    with pytest.raises(CheckpointFormatError, match="unsupported zstd configuration"):
        fast.load_checkpoint(cid)
    edit(ckpt, "state/f64", lambda d: d["codecs"].__setitem__(1, {"name": "gzip", "configuration": {"level": 1}}))
    with pytest.raises(CheckpointFormatError, match="unsupported codecs"):
        fast.load_checkpoint(cid)


def test_random_data_switches_compression_off(fast):
    bits = np.random.default_rng(1).integers(0, 1 << 32, (300, 1000), dtype=np.uint32)  # random bytes
    state = {"bits": bits, "tiny": np.arange(3, dtype=np.int8)}
    cid = fast.create_checkpoint("r", 1, state, compression="zstd")
    ckpt = fast.checkpoint_path(cid)
    assert codecs_of(ckpt, "bits") == codecs_of(ckpt, "tiny") == ["bytes", "crc32c"]
    assert root_attrs(ckpt)["format_version"] == 1  # nothing compressed: a version 1 checkpoint
    assert os.path.getsize(chunk_path(ckpt, "bits", "c.0.0")) == bits.nbytes + 4
    assert_bit_exact(state, fast.load_checkpoint(cid)["state"])
    # min_saving=0: compressed whatever it saves
    cid = fast.create_checkpoint("r", 2, state, compression=Compression("zstd", min_saving=0))
    assert codecs_of(fast.checkpoint_path(cid), "bits") == ["bytes", "zstd", "crc32c"]
    assert_bit_exact(state, fast.load_checkpoint(cid)["state"])
    # a stricter threshold switches off what the default keeps
    ramp = {"ramp": np.linspace(0.0, 1.0, 100_000)}  # zstd: about 0.7 of raw
    cid = fast.create_checkpoint("r", 3, ramp, compression=Compression("zstd", min_saving=0.5))
    assert codecs_of(fast.checkpoint_path(cid), "ramp") == ["bytes", "crc32c"]
    cid = fast.create_checkpoint("r", 4, ramp, compression="zstd")
    assert codecs_of(fast.checkpoint_path(cid), "ramp") == ["bytes", "zstd", "crc32c"]


def test_uncompressed_is_the_default_and_stays_format_v1(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", durable=False, pack_max_bytes=0)  # packs make version 3
    assert mgr.compression is None
    ckpt = mgr.checkpoint_path(mgr.create_checkpoint("r", 1, STATE))
    assert root_attrs(ckpt)["format_version"] == 1
    assert all(codecs_of(ckpt, p) == ["bytes", "crc32c"] for p, _ in leaves(STATE))
    assert os.path.getsize(chunk_path(ckpt, "sparse", "c.0.0")) == 4 << 20 | 4


def test_manager_default_per_save_override_and_per_leaf_policy(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", durable=False, compression="blosc", pack_max_bytes=0)
    ckpt = mgr.checkpoint_path(mgr.create_checkpoint("r", 1, STATE))
    assert codecs_of(ckpt, "sparse") == ["bytes", "blosc", "crc32c"]
    ckpt = mgr.checkpoint_path(mgr.create_checkpoint("r", 2, STATE, compression=None))
    assert codecs_of(ckpt, "sparse") == ["bytes", "crc32c"] and root_attrs(ckpt)["format_version"] == 1
    seen = []

    def policy(path, array):
        seen.append((path, np.shape(array)))
        return Compression("zstd", level=1) if path.startswith("opt/") else None

    ckpt = mgr.checkpoint_path(mgr.create_checkpoint("r", 3, STATE, compression=policy))
    assert codecs_of(ckpt, "opt/mu") == codecs_of(ckpt, "opt/nu") == ["bytes", "zstd", "crc32c"]
    assert codecs_of(ckpt, "sparse") == ["bytes", "crc32c"]
    assert ("sparse", (1100, 1024)) in seen and ("opt/mu", (64, 64)) in seen
    with open(os.path.join(ckpt, "state", "opt", "mu", "zarr.json")) as f:
        assert json.load(f)["codecs"][1] == {"name": "zstd", "configuration": {"level": 1, "checksum": False}}
    with open(os.path.join(mgr.checkpoint_path("r-i000000000001"), "state", "u16", "zarr.json")) as f:
        blosc = json.load(f)["codecs"][1]
    assert blosc == {
        "name": "blosc",
        "configuration": {"typesize": 2, "cname": "zstd", "clevel": 5, "shuffle": "shuffle", "blocksize": 0},
    }


@pytest.mark.parametrize(
    "option, message",
    [
        ("gzip", "compression: unknown codec 'gzip'; expected None, 'zstd', 'blosc', a Compression"),
        (3, "compression: expected None, 'zstd', 'blosc'"),
        ({"codec": "zstd", "lvl": 3}, r"unknown setting\(s\) \['lvl'\]"),
        ({"codec": "zstd", "level": 99}, "zstd level must be an int from 1 to 22"),
        ({"codec": "blosc", "level": 10}, "blosc level must be an int from 1 to 9"),
        ({"codec": "blosc", "cname": "snappy"}, "cname .* must be one of"),
        ({"min_saving": 1.5}, r"min_saving must be a fraction in \[0, 1\)"),
        ({"shuffle": "yes"}, "shuffle must be True or False"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        CheckpointManager(tmp_path / "a", compression=option)
    mgr = CheckpointManager(tmp_path / "b")
    with pytest.raises(ValueError, match=message):
        mgr.create_checkpoint("r", 1, {"x": np.ones(3)}, compression=option)
    assert mgr.list_checkpoints() == []


def test_a_policy_returning_a_bad_value_names_the_leaf(fast):
    with pytest.raises(ValueError, match=r"compression policy, for the leaf at 'opt/mu': unknown codec 'lzma'"):
        fast.create_checkpoint("r", 1, STATE, compression=lambda path, a: "lzma" if path == "opt/mu" else None)
    assert fast.list_checkpoints() == []


def test_sharded_leaves_rollback_and_export(fast, tmp_path):
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    big = np.where(np.arange(2048 * 1024) % 31 == 0, 2.0, 0.0).astype(np.float32).reshape(2048, 1024)
    x = jax.device_put(big, NamedSharding(mesh, P("a", "b")))  # blocks of 512 x 512
    cid = fast.create_checkpoint("r", 1, {"x": x, "y": STATE["f64"]}, compression="zstd")
    ckpt = fast.checkpoint_path(cid)
    assert codecs_of(ckpt, "x") == ["bytes", "zstd", "crc32c"] and len(os.listdir(os.path.join(ckpt, "state/x"))) == 9
    target = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), "y": STATE["f64"]}
    out = fast.load_checkpoint(cid, target=target)["state"]
    assert out["x"].sharding == x.sharding and np.asarray(out["x"]).tobytes() == big.tobytes()
    rb = fast.rollback_to_checkpoint(cid, "branch")
    assert root_attrs(fast.checkpoint_path(rb))["format_version"] == 2
    assert_bit_exact({"x": big, "y": STATE["f64"]}, fast.load_checkpoint(rb)["state"])
    npz = np.load(export_checkpoint(fast, cid, tmp_path / "out.npz"))
    assert npz[next(k for k in npz.files if "x" in k and "y" not in k)].tobytes() == big.tobytes()


def test_an_object_store_round_trip(s3_url):
    mgr = CheckpointManager(s3_url, compression="zstd")
    state = {"sparse": STATE["sparse"], "bf16": STATE["bf16"]}
    cid = mgr.create_checkpoint("r", 1, state)
    assert_bit_exact(state, mgr.load_checkpoint(cid)["state"])
    lazy = mgr.open_checkpoint(cid).state["sparse"]
    np.testing.assert_array_equal(lazy[1098:, :3], STATE["sparse"][1098:, :3])
    assert mgr.verify_checkpoint(cid).ok
    assert mgr.store.last_upload["bytes_put"] < STATE["sparse"].nbytes // 4


def test_compressed_root_attributes_validate_against_the_schema(fast):
    import jsonschema

    spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spec", "schemas")
    with open(os.path.join(spec, "checkpoint-attrs.schema.json")) as f:
        schema = json.load(f)
    ckpt = fast.checkpoint_path(fast.create_checkpoint("r", 1, STATE, compression="zstd"))
    jsonschema.validate(root_attrs(ckpt), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**root_attrs(ckpt), "format_version": 4}, schema)


FORCED = [
    Compression("zstd", min_saving=0),
    Compression("blosc", min_saving=0),
    Compression("blosc", cname="lz4", shuffle=False, min_saving=0),
]
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_ids = itertools.count()


@PROPERTY
@given(tree=pytrees, compression=st.sampled_from(FORCED))
def test_any_pytree_round_trips_bit_exactly_compressed(tree, compression):
    """Every dtype the format stores (random bits, NaN payloads, sub-byte types), compressed
    whatever it saves (``min_saving=0``): bit-exact."""
    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d, durable=False, compression=compression)
        cid = mgr.create_checkpoint("prop", next(_ids), tree)
        assert_tree_equal(tree, mgr.load_checkpoint(cid)["state"])


@PROPERTY
@given(a=arrays(max_side=40), compression=st.sampled_from(FORCED))
def test_lazy_slices_of_compressed_arrays_equal_numpy_slices(a, compression):
    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d, durable=False, compression=compression)
        lazy = mgr.open_checkpoint(mgr.create_checkpoint("lazy", 0, {"a": a})).state["a"]
        assert_lazy_slices_match(lazy, a)
