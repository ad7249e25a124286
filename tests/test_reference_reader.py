"""spec/reference_reader.py (zarr-python and the spec, no project code) reads the golden v1,
v2 and v3 checkpoints, and packed leaves the package wrote, bit-exactly and refuses damage.
Every reader runs in a fresh subprocess that never imports computable_flows_shim."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READER = os.path.join(ROOT, "spec", "reference_reader.py")
GOLDEN = os.path.join(ROOT, "tests", "golden", "v1", "golden-i000000000042")


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_reference_reader_reads_the_golden_checkpoint_bit_exactly():
    r = run_python(
        """
        import sys
        sys.path[:0] = [sys.argv[1], sys.argv[2]]
        import numpy as np
        import make_golden_v1 as v1
        from reference_reader import read_checkpoint

        def same(expected, got, where='state'):
            if isinstance(expected, dict) or hasattr(expected, '_asdict'):
                expected = expected._asdict() if hasattr(expected, '_asdict') else expected
                assert isinstance(got, dict) and list(got) == list(expected), (where, got)
                for k in expected:
                    same(expected[k], got[k], f'{where}[{k!r}]')
            elif isinstance(expected, (list, tuple)):
                assert type(got) is type(expected) and len(got) == len(expected), where
                for i, (e, g) in enumerate(zip(expected, got)):
                    same(e, g, f'{where}[{i}]')
            elif isinstance(expected, (np.ndarray, np.generic)):
                assert type(got) is type(expected), (where, type(got))
                assert got.dtype == expected.dtype and got.shape == expected.shape, (where, got.dtype, got.shape)
                assert np.asarray(got).tobytes() == np.asarray(expected).tobytes(), where
            else:
                assert type(got) is type(expected) and (got == expected or got != got), (where, got, expected)

        attrs, state, cols, events = read_checkpoint(sys.argv[3])
        expected = v1.expected_state()
        impl, key_data = state['rng'].pop('key')[1:]
        assert impl == 'threefry2x32'
        state['rng']['key_data'] = key_data
        same(expected, state)
        hist = v1.expected_history()
        for k in ('iter', 'E', 'grad_norm'):
            assert cols[k].tobytes() == np.asarray(hist[k]).tobytes(), k
        assert list(cols['phase']) == hist['phase']
        assert events == hist['events']
        assert attrs['iteration'] == 42 and attrs['run_id'] == 'golden'
        assert attrs['flow_config'] == {'step_size': 0.1, 'operator': 'blur', 'levels': 3}
        assert 'computable_flows_shim' not in sys.modules
        print('OK')
        """,
        os.path.join(ROOT, "spec"),
        os.path.join(ROOT, "tests", "golden"),
        GOLDEN,
    )
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr


def test_reference_reader_command_line_lists_leaves_and_telemetry():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, READER, GOLDEN, "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["checkpoint_id"] == "golden-i000000000042"
    assert report["leaves"]["state['chunked']"] == {"shape": [3, 8, 1024], "dtype": "float32"}
    assert report["leaves"]["state['dtypes']['bfloat16']"] == {"shape": [3, 5], "dtype": "bfloat16"}
    assert report["leaves"]["state['rng']['key']"]["prng_key"] == "threefry2x32"
    assert report["telemetry"]["phase"] == {"length": 5, "dtype": "object"}
    assert report["events"] == ["RUN_STARTED", "CHECKPOINT_CREATED"]


def _flip_first_byte(path):
    with open(path, "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 1]))


def _swap(a, b):
    tmp = a + ".swap"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _flip_first_byte(os.path.join(d, "state/dtypes/float32/c.0.0")), "checksum"),
        (lambda d: _flip_first_byte(os.path.join(d, "state/dtypes/bfloat16/c.0.0")), "crc32c"),
        (lambda d: os.unlink(os.path.join(d, "state/chunked/c.0.0.0")), "chunk file missing"),
        (
            lambda d: _swap(os.path.join(d, "state/dtypes/int32/c.0"), os.path.join(d, "state/dtypes/uint32/c.0")),
            "manifest",
        ),
        (lambda d: os.truncate(os.path.join(d, "state/dtypes/int64/c.0"), 10), "truncated"),
        (lambda d: os.unlink(os.path.join(d, "telemetry/event_type/c.0")), "chunk file missing"),
    ],
    ids=["bit-flip", "bit-flip-bfloat16", "missing-chunk", "swapped-chunks", "truncated", "missing-telemetry"],
)
def test_reference_reader_refuses_damage(tmp_path, damage, message):
    d = str(tmp_path / os.path.basename(GOLDEN))
    shutil.copytree(GOLDEN, d)  # never damage the committed copy
    damage(d)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, READER, d], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "refused" in r.stderr and message in r.stderr, r.stderr


GOLDEN_V2 = os.path.join(ROOT, "tests", "golden", "v2", "golden-i000000000007")


def test_reference_reader_reads_the_golden_v2_checkpoint_bit_exactly():
    """Format v2: zstd and blosc chunks, decoded by zarr-python (core types) or numcodecs
    (extension types) after the reader checked each chunk's stated size."""
    r = run_python(
        """
        import sys
        sys.path[:0] = [sys.argv[1], sys.argv[2]]
        import numpy as np
        import make_golden_v2 as v2
        from reference_reader import read_checkpoint

        def leaves(t, p=''):
            for k, v in t.items():
                yield from leaves(v, f'{p}{k}/') if isinstance(v, dict) else [(p + k, v)]

        attrs, state, cols, events = read_checkpoint(sys.argv[3])
        assert attrs['format_version'] == 2
        got = dict(leaves(state))
        n = 0
        for path, e in leaves(v2.expected_state()):
            if isinstance(e, (np.ndarray, np.generic)):
                g = got[path]
                assert g.dtype == e.dtype and g.shape == e.shape and g.tobytes() == e.tobytes(), path
                n += 1
        assert n == 14 and list(cols['phase']) == v2.expected_history()['phase']
        assert 'computable_flows_shim' not in sys.modules
        print('OK')
        """,
        os.path.join(ROOT, "spec"),
        os.path.join(ROOT, "tests", "golden"),
        GOLDEN_V2,
    )
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr


def _replace_chunk(d, rel, key, body):
    """A chunk with a valid CRC32C trailer and manifest entry: only the stated size can refuse it."""
    import crc32c

    crc = crc32c.crc32c(body)
    with open(os.path.join(d, rel, key), "wb") as f:
        f.write(body + crc.to_bytes(4, "little"))
    meta = os.path.join(d, rel, "zarr.json")
    with open(meta) as f:
        doc = json.load(f)
    doc["attributes"]["cfs_chunk_crc32c"][0] = crc
    with open(meta, "w") as f:
        json.dump(doc, f)


def _zstd_bomb():
    import numcodecs

    return numcodecs.Zstd(level=19).encode(bytes(64 << 20))  # states 64 MiB: far more than the chunk


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _flip_first_byte(os.path.join(d, "state/zstd/sparse/c.1.0")), "checksum"),
        (lambda d: _flip_first_byte(os.path.join(d, "state/zstd/bfloat16/c.0.0")), "crc32c"),
        (lambda d: _flip_first_byte(os.path.join(d, "state/blosc/float64/c.0")), "checksum"),
        (lambda d: _replace_chunk(d, "state/zstd/int64", "c.0", _zstd_bomb()), "does not decode to 8000 bytes"),
        (lambda d: os.truncate(os.path.join(d, "state/blosc/uint16/c.0"), 4), "bad compressed size"),
    ],
    ids=["bit-flip-zstd", "bit-flip-zstd-bfloat16", "bit-flip-blosc", "zstd-bomb", "truncated-blosc"],
)
def test_reference_reader_refuses_damaged_compressed_chunks(tmp_path, damage, message):
    d = str(tmp_path / os.path.basename(GOLDEN_V2))
    shutil.copytree(GOLDEN_V2, d)
    damage(d)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, READER, d], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "refused" in r.stderr and message in r.stderr, r.stderr


LEAF_DIGESTS = """
        import json, sys
        sys.path[:0] = [sys.argv[1], sys.argv[2]]
        import numpy as np
        from reference_reader import read_checkpoint

        def leaves(t, p=''):
            if isinstance(t, dict):
                for k, v in t.items():
                    yield from leaves(v, f'{p}{k}/')
            elif isinstance(t, list):
                for i, v in enumerate(t):
                    yield from leaves(v, f'{p}{i}/')
            else:
                yield p[:-1], t

        attrs, state, cols, events = read_checkpoint(sys.argv[3])
        out = {'format_version': attrs['format_version'], 'leaves': {}}
        for path, v in leaves(state):
            if isinstance(v, tuple):  # a PRNG key
                out['leaves'][path] = [v[1], str(v[2].dtype), list(v[2].shape), v[2].tobytes().hex()]
            elif isinstance(v, (np.ndarray, np.generic)):
                kind = 'scalar' if isinstance(v, np.generic) else 'array'
                out['leaves'][path] = [kind, str(v.dtype), list(v.shape), v.tobytes().hex()]
            else:
                out['leaves'][path] = repr(v)
        assert 'computable_flows_shim' not in sys.modules
        print(json.dumps(out))
        """
"""A subprocess that reads ``sys.argv[3]`` with the reference reader and prints, as JSON,
``[kind, dtype, shape, hex bytes]`` of every array leaf by path (PRNG keys: ``[impl, ...]``
of their key data), ``repr`` of every other leaf."""


def _expected_digest(state) -> dict:
    """What ``LEAF_DIGESTS`` prints for the saved ``state``, computed with the package."""
    import jax
    import numpy as np

    out = {}

    def walk(t, p=""):
        if isinstance(t, dict):
            for k, v in t.items():
                walk(v, f"{p}{k}/")
        elif isinstance(t, list):
            for i, v in enumerate(t):
                walk(v, f"{p}{i}/")
        elif isinstance(t, jax.Array) and jax.dtypes.issubdtype(t.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(t))
            out[p[:-1]] = [str(jax.random.key_impl(t)), str(data.dtype), list(data.shape), data.tobytes().hex()]
        elif isinstance(t, (np.ndarray, np.generic)):
            kind = "scalar" if isinstance(t, np.generic) else "array"
            out[p[:-1]] = [kind, str(t.dtype), list(t.shape), t.tobytes().hex()]
        else:
            out[p[:-1]] = repr(t)

    walk(state)
    return out


def test_reference_reader_reads_packed_leaves_bit_exactly(tmp_path):
    """Format v3: packed leaves of several data types (two to a pack, a 0-d numpy scalar, PRNG
    keys in the uint32 pack) beside an unpacked leaf above the limit, as the package saved them."""
    import jax
    import ml_dtypes
    import numpy as np

    from computable_flows_shim import CheckpointManager

    state = {
        "f32": np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5),
        "f32b": np.array([np.nan, -0.0, np.inf], np.float32),
        "bf16": (np.arange(9) / 7).astype(ml_dtypes.bfloat16),
        "i8": np.arange(-4, 5, dtype=np.int8),
        "u8": np.arange(3, dtype=np.uint8),
        "int4": np.array([-8, 7], ml_dtypes.int4),
        "scalar": np.float64(-0.0),
        "iscalar": np.int32(-7),
        "key": jax.random.key(5),
        "rbg": jax.random.key(6, impl="rbg"),
        "big": np.arange(20000, dtype=np.float32),
        "list": [1, None, "s"],
    }
    mgr = CheckpointManager(tmp_path / "store")
    path = mgr.checkpoint_path(mgr.create_checkpoint("r", 1, state))
    with open(os.path.join(path, "zarr.json")) as f:
        attrs = json.load(f)["attributes"]
    packed = {n["path"]: n.get("packed") for n in attrs["pytree"]["children"] if n["kind"] == "array"}
    assert attrs["format_version"] == 3 and packed["big"] is None
    assert packed["f32b"]["array"] == "float32" and packed["f32b"]["offset"] == 16
    assert packed["rbg"]["array"] == "uint32" and packed["rbg"]["cfs_prng_key_impl"] == "rbg"
    r = run_python(LEAF_DIGESTS, os.path.join(ROOT, "spec"), os.path.join(ROOT, "tests", "golden"), path)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)
    assert got["format_version"] == 3
    assert got["leaves"] == _expected_digest(state)


GOLDEN_V3 = os.path.join(ROOT, "tests", "golden", "v3", "golden-i000000000003")


def test_reference_reader_reads_the_golden_v3_checkpoint_bit_exactly():
    """The golden v3 checkpoint: packs of core and extension types, PRNG keys, a compressed and
    an empty unpacked leaf."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "golden"))
    import make_golden_v3 as v3

    r = run_python(LEAF_DIGESTS, os.path.join(ROOT, "spec"), os.path.join(ROOT, "tests", "golden"), GOLDEN_V3)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout)
    assert got["format_version"] == 3
    assert got["leaves"] == _expected_digest(v3.stored_state())


def _rewrite_packed_leaf(d, pack, offset, new_bytes):
    """Change a packed leaf's bytes in its pack chunk (one chunk) with the chunk's CRC32C
    trailer and manifest entry rewritten to match: only the leaf's own crc32c can refuse it."""
    import crc32c

    chunk = os.path.join(d, "packed", pack, "c.0")
    with open(chunk, "rb") as f:
        body = bytearray(f.read()[:-4])
    body[offset : offset + len(new_bytes)] = new_bytes
    _replace_chunk(d, f"packed/{pack}", "c.0", bytes(body))
    with open(os.path.join(d, "packed", pack, "c.0"), "rb") as f:
        raw = f.read()
    assert int.from_bytes(raw[-4:], "little") == crc32c.crc32c(raw[:-4])


def _edit_packed_node(d, path, **changes):
    """Change the ``packed`` member of the array node at ``path`` in the root attributes."""
    meta = os.path.join(d, "zarr.json")
    with open(meta) as f:
        doc = json.load(f)

    def walk(node):
        if node.get("path") == path:
            node["packed"].update(changes)
        for c in node.get("children", []):
            walk(c)

    walk(doc["attributes"]["pytree"])
    with open(meta, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize(
    "damage, message",
    [
        # layer/b: 6 float32 at element 16 (byte 64) of packed/float32
        (lambda d: _rewrite_packed_leaf(d, "float32", 64 + 4, b"\x00\x00\x80\x3f"), "does not match its crc32c"),
        # layer/shift: 4 bfloat16 at element 32 (byte 64) of packed/bfloat16 (decoded by this reader)
        (lambda d: _rewrite_packed_leaf(d, "bfloat16", 64, b"\x80\x3f"), "does not match its crc32c"),
        (lambda d: _flip_first_byte(os.path.join(d, "packed/float32/c.0")), "checksum"),
        (lambda d: os.unlink(os.path.join(d, "packed/uint32/c.0")), "chunk file missing"),
        (lambda d: _edit_packed_node(d, "layer/b", offset=18), "does not fit"),
        (lambda d: _edit_packed_node(d, "layer/b", array="../state"), "bad pack name"),
        (lambda d: _edit_packed_node(d, "layer/b", shape=[0]), "does not fit"),
        (lambda d: _edit_packed_node(d, "layer/b", crc32c=True), "bad packed leaf"),
        (lambda d: _edit_packed_node(d, "layer/b", offset=0), "does not match its crc32c"),
        (lambda d: _edit_packed_node(d, "rng/rbg", cfs_prng_key_impl="philox"), "unknown PRNG key"),
    ],
    ids=[
        "rewritten-leaf",
        "rewritten-leaf-bfloat16",
        "bit-flip-pack",
        "missing-pack-chunk",
        "out-of-range",
        "unsafe-pack-name",
        "empty-shape",
        "bool-crc",
        "another-leafs-range",
        "bad-key-impl",
    ],
)
def test_reference_reader_refuses_damaged_packed_leaves(tmp_path, damage, message):
    d = str(tmp_path / os.path.basename(GOLDEN_V3))
    shutil.copytree(GOLDEN_V3, d)
    damage(d)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, READER, d], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "refused" in r.stderr and message in r.stderr, r.stderr
