"""spec/reference_reader.py (zarr-python and the spec, no project code) reads the golden v1
checkpoint bit-exactly and refuses damage.  Every reader runs in a fresh subprocess that
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
