"""spec/reference_reader.py (zarr-python and the spec, no project code) reads the golden v1
and v2 checkpoints bit-exactly and refuses damage.  Every reader runs in a fresh subprocess that
never imports computable_flows_shim."""

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
