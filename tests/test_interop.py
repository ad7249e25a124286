"""Other tools read our checkpoints with no project code: each reader runs in a fresh
subprocess that never imports computable_flows_shim and compares against .npy files."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

CORE = {
    "x": np.arange(24.0).reshape(2, 3, 4),
    "i8": np.arange(-3, 3, dtype=np.int8),
    "u64": np.array([2**64 - 1], np.uint64),
    "b": np.array([True, False, True]),
    "c64": np.array([1 + 2j, -3j], np.complex64),
    "c128": np.array([1e300 + 1j]),
    "f16": np.array([1.5, -0.0], np.float16),
    "scalar": np.float64(3.25),
    "empty": np.zeros((0, 3), np.float32),
    "nested": {"deep": {"w": np.arange(12, dtype=np.int32).reshape(3, 4)}},
    "big": np.arange(2 * 1024 * 1024, dtype=np.float32).reshape(2048, 1024),  # 8 MiB: 2 chunks
}
EXT = {
    "bf16": jnp.arange(5, dtype=jnp.bfloat16),
    "f8": np.arange(6).astype(ml_dtypes.float8_e4m3fn),
    "f8e5": np.arange(6).astype(ml_dtypes.float8_e5m2),
    "i4": np.arange(-4, 4).astype(ml_dtypes.int4),
}
HIST = {
    "iter": np.arange(0, 50, 10),
    "E": np.linspace(5, 1, 5),
    "grad_norm": np.logspace(0, -2, 5),
    "phase": ["RED", "AMBER", "GREEN", "GREEN", "GREEN"],
    "events": [{"type": "RUN_STARTED", "iter": 0}, {"type": "CHECKPOINT_CREATED", "iter": 40, "payload": {"k": 1}}],
}


def leaf_paths(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from leaf_paths(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", np.asarray(v)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from computable_flows_shim import CheckpointManager

    d = tmp_path_factory.mktemp("interop")
    mgr = CheckpointManager(d / "store", pack_max_bytes=0)  # every leaf its own array (packs: test_reference_reader)
    core = mgr.checkpoint_path(mgr.create_checkpoint("core", 1, CORE, {"lr": 0.5}, telemetry_history=HIST))
    ext = mgr.checkpoint_path(mgr.create_checkpoint("ext", 1, {**CORE, **EXT}, {}, telemetry_history=HIST))
    exp = d / "expected"
    exp.mkdir()
    for path, a in leaf_paths({**CORE, **EXT}):
        raw = a.view(np.uint8) if a.dtype.itemsize and a.ndim else a.reshape(1).view(np.uint8)
        np.save(exp / (path.replace("/", "__") + ".npy"), raw)
        (exp / (path.replace("/", "__") + ".meta")).write_text(f"{a.dtype.name};{','.join(map(str, a.shape))}")
    return {"core": core, "ext": ext, "exp": str(exp)}


def run_alone(code: str, **paths) -> str:
    prelude = textwrap.dedent("""
        import os, sys, numpy as np
        def expected(path):
            base = os.path.join(EXP, path.replace('/', '__'))
            raw = np.load(base + '.npy')
            name, shape = open(base + '.meta').read().split(';')
            return raw, name, tuple(int(s) for s in shape.split(',') if s)
        def same(a, path):
            raw, name, shape = expected(path)
            a = np.asarray(a)
            assert a.shape == shape, (path, a.shape, shape)
            got = a.view(np.uint8) if a.ndim else a.reshape(1).view(np.uint8)
            assert np.array_equal(got.reshape(-1), raw.reshape(-1)), path
    """)
    assigns = "".join(f"{k.upper()} = {v!r}\n" for k, v in paths.items())
    tail = "\nassert 'computable_flows_shim' not in sys.modules\nprint('OK')\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", assigns + prelude + textwrap.dedent(code) + tail],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    return r.stdout


def test_zarr_python_alone_reads_every_core_array(ckpt):
    run_alone(
        """
        import zarr
        g = zarr.open_group(CORE, mode='r')
        assert g.attrs['run_id'] == 'core' and g.attrs['flow_config'] == {'lr': 0.5}
        n = 0
        for path in ['x','i8','u64','b','c64','c128','f16','scalar','empty','nested/deep/w','big']:
            a = g['state/' + path]
            same(a[...], path); n += 1
            assert len(set(a.metadata.dimension_names)) == a.ndim
        assert [c.to_dict()['name'] for c in g['state/x'].metadata.codecs] == ['bytes', 'crc32c']
        print(n)
    """,
        core=ckpt["core"],
        exp=ckpt["exp"],
    )


def test_tensorstore_alone_reads_every_array_including_ml_dtypes(ckpt):
    out = run_alone(
        """
        import tensorstore as ts
        n = 0
        for path in ['x', 'i8', 'u64', 'b', 'c64', 'c128', 'f16', 'scalar', 'empty', 'nested/deep/w', 'big',
                     'bf16', 'f8', 'f8e5', 'i4']:
            spec = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': EXT + '/state/' + path}}
            t = ts.open(spec, open=True).result()
            raw, name, shape = expected(path)
            assert t.dtype.name == name, (path, t.dtype.name, name)
            same(t.read().result(), path); n += 1
        print(n)
    """,
        ext=ckpt["ext"],
        exp=ckpt["exp"],
    )
    assert "15" in out


def test_xarray_alone_opens_telemetry_and_state(ckpt):
    run_alone(
        """
        import warnings, xarray as xr
        warnings.simplefilter('error')
        ds = xr.open_zarr(CORE, group='telemetry')
        assert list(ds['iter'].values) == [0, 10, 20, 30, 40]
        assert ds['E'].dims == ('iter',) and float(ds['E'][-1]) == 1.0
        assert list(ds['phase'].values) == ['RED', 'AMBER', 'GREEN', 'GREEN', 'GREEN']
        assert list(ds['event_type'].values) == ['RUN_STARTED', 'CHECKPOINT_CREATED']
        st = xr.open_zarr(CORE, group='state')
        same(st['x'].values, 'x')
        assert st['x'].dims == ('x.d0', 'x.d1', 'x.d2')
        # with extension dtypes there is no consolidated metadata: say so explicitly
        ds2 = xr.open_zarr(EXT, group='telemetry', consolidated=False)
        assert float(ds2['grad_norm'][0]) == 1.0
    """,
        core=ckpt["core"],
        ext=ckpt["ext"],
        exp=ckpt["exp"],
    )


def test_dask_alone_reduces_a_leaf(ckpt):
    run_alone(
        """
        import dask.array as da
        a = da.from_zarr(CORE, component='state/big')
        assert a.chunks[0][0] * a.chunks[1][0] * 4 <= 4 * 1024 * 1024
        assert float(a.sum().compute()) == float(np.arange(2*1024*1024, dtype=np.float64).sum())
    """,
        core=ckpt["core"],
    )


def test_dask_alone_reads_every_core_array_and_telemetry_column(ckpt):
    run_alone(
        """
        import dask.array as da
        n = 0
        for path in ['x', 'i8', 'u64', 'b', 'c64', 'c128', 'f16', 'scalar', 'empty', 'nested/deep/w', 'big']:
            a = da.from_zarr(CORE, component='state/' + path)
            same(a.compute(), path); n += 1
        assert n == 11
        assert list(da.from_zarr(CORE, component='telemetry/iter').compute()) == [0, 10, 20, 30, 40]
        assert float(da.from_zarr(CORE, component='telemetry/grad_norm')[-1].compute()) == 0.01
        assert list(da.from_zarr(CORE, component='telemetry/event_type').compute()) == ['RUN_STARTED',
                                                                                          'CHECKPOINT_CREATED']
    """,
        core=ckpt["core"],
        exp=ckpt["exp"],
    )


@pytest.fixture(scope="module")
def ml_ckpt(tmp_path_factory):
    """A checkpoint with a leaf of every ML data type the format writes, and the expected bits."""
    from computable_flows_shim import CheckpointManager
    from computable_flows_shim._format.dtypes import EXTENSION_NAMES

    d = tmp_path_factory.mktemp("ml")
    rng = np.random.default_rng(0)
    state = {}
    for name in sorted(EXTENSION_NAMES):
        dt = np.dtype(getattr(ml_dtypes, name))
        info = ml_dtypes.iinfo(dt) if name.startswith(("int", "uint")) else None
        vals = rng.integers(info.min, info.max + 1, 40) if info else rng.standard_normal(40) * 2
        state[name] = np.asarray(vals).astype(dt).reshape(5, 8)
    mgr = CheckpointManager(d / "store", pack_max_bytes=0)
    path = mgr.checkpoint_path(mgr.create_checkpoint("ml", 1, state, telemetry_history=HIST))
    exp = d / "expected"
    exp.mkdir()
    for name, a in state.items():
        np.save(exp / f"{name}.npy", a.view(np.uint8))
        (exp / f"{name}.meta").write_text(f"{a.dtype.name};{','.join(map(str, a.shape))}")
    return {"ml": path, "exp": str(exp), "names": sorted(state)}


def test_zarr_python_and_dask_read_every_ml_dtype_without_the_library(ml_ckpt):
    """``import computable_flows_shim_zarr`` (numpy, ml_dtypes and zarr only: no JAX, not the
    checkpoint library) and zarr-python, dask and xarray read every ML leaf bit-exactly."""
    out = run_alone(
        f"""
        import computable_flows_shim_zarr, zarr, dask.array as da, xarray as xr
        names = {ml_ckpt["names"]!r}
        g = zarr.open_group(ML, mode='r')
        for name in names:
            a = g['state/' + name]
            raw, dtype, shape = expected(name)
            assert str(a.dtype) == dtype == name, (name, a.dtype)
            same(a[...], name)
            part, whole = np.ascontiguousarray(a[1:3, ::2]), np.ascontiguousarray(np.asarray(a[...])[1:3, ::2])
            assert part.tobytes() == whole.tobytes(), name  # a strided slice reads the same bits
            same(da.from_zarr(ML, component='state/' + name).compute(), name)
        ds = xr.open_zarr(ML, group='state', consolidated=False)
        for name in names:
            same(ds[name].values, name)
        assert 'jax' not in sys.modules
        print(len(names))
    """,
        ml=ml_ckpt["ml"],
        exp=ml_ckpt["exp"],
    )
    assert f"{len(ml_ckpt['names'])}\n" in out


def test_without_the_import_zarr_python_does_not_know_the_ml_types(ml_ckpt):
    """What the import above is for: zarr-python 3.1 does not load the ``zarr.data_type`` entry
    points the package declares when it reads metadata (if a later zarr does, this test says so
    and the README's advice can go)."""
    run_alone(
        """
        import zarr
        try:
            zarr.open_group(ML, mode='r')['state/bfloat16']
        except ValueError as e:
            assert 'bfloat16' in str(e)
        else:
            raise AssertionError('zarr-python now reads bfloat16 on its own: update README and spec')
    """,
        ml=ml_ckpt["ml"],
        exp=ml_ckpt["exp"],
    )


def test_the_entry_points_declare_exactly_the_format_s_ml_types():
    from importlib.metadata import entry_points

    import computable_flows_shim_zarr as z
    from computable_flows_shim._format.dtypes import EXTENSION_NAMES

    eps = {e.name: e for e in entry_points().select(group="zarr.data_type") if e.value.startswith(z.__name__)}
    assert set(eps) == set(EXTENSION_NAMES) == set(z.NAMES) == set(z.DATA_TYPES)
    # the list stands in three places on purpose (the zarr adapter and the spec's reference reader
    # import nothing of the package): they must stay the same list
    from computable_flows_shim._format import dtypes

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spec", "reference_reader.py")
    spec = importlib.util.spec_from_file_location("reference_reader", path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    assert list(z.NAMES) == list(dtypes._EXTENSION) == list(reference.EXTENSION_TYPES)
    for name, ep in eps.items():
        cls = ep.load()
        native = np.dtype(getattr(ml_dtypes, name))
        assert cls._zarr_v3_name == name and cls.from_native_dtype(native).to_json(3) == name


COMPRESSED = {
    "sparse": np.where(np.arange(1100 * 1024) % 97 == 0, 1.5, 0.0).astype(np.float32).reshape(1100, 1024),  # 2 chunks
    "ramp": np.linspace(0, 1, 5000),
    "i64": np.arange(-300, 300, dtype=np.int64),
    "bf16": np.repeat(np.arange(40.0), 10).astype(ml_dtypes.bfloat16),
    "random": np.random.default_rng(1).integers(0, 1 << 32, 4096, dtype=np.uint32),  # random bits: uncompressed
}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """The same state written with zstd, blosc (zstd, shuffle) and blosc (lz4, no shuffle)."""
    from computable_flows_shim import CheckpointManager, Compression

    d = tmp_path_factory.mktemp("compressed")
    mgr = CheckpointManager(d / "store", durable=False, pack_max_bytes=0)
    paths = {}
    for name, comp in [
        ("zstd", "zstd"),
        ("blosc", "blosc"),
        ("lz4", Compression("blosc", cname="lz4", shuffle=False, level=3)),
    ]:
        paths[name] = mgr.checkpoint_path(
            mgr.create_checkpoint(name, 1, COMPRESSED, telemetry_history=HIST, compression=comp)
        )
    exp = d / "expected"
    exp.mkdir()
    for path, a in leaf_paths(COMPRESSED):
        np.save(exp / (path + ".npy"), a.view(np.uint8))
        (exp / (path + ".meta")).write_text(f"{a.dtype.name};{','.join(map(str, a.shape))}")
    return {**paths, "exp": str(exp)}


def test_zarr_python_alone_decodes_zstd_and_blosc_checkpoints(compressed):
    """zarr-python (with the ML types' module, which imports neither JAX nor the library) decodes
    every compressed array, and sees the codec chain bytes -> zstd|blosc -> crc32c."""
    run_alone(
        """
        import computable_flows_shim_zarr, zarr
        for ckpt, codec in [(ZSTD, 'zstd'), (BLOSC, 'blosc'), (LZ4, 'blosc')]:
            g = zarr.open_group(ckpt, mode='r')
            assert g.attrs['format_version'] == 2
            for path in ['sparse', 'ramp', 'i64', 'bf16', 'random']:
                a = g['state/' + path]
                same(a[...], path)
                names = [c.to_dict()['name'] for c in a.metadata.codecs]
                assert names in (['bytes', 'crc32c'], ['bytes', codec, 'crc32c']), names  # switched off or not
                if path in ('sparse', 'i64'):
                    assert names == ['bytes', codec, 'crc32c'], (path, names)
                if path == 'random':  # random bits: switched off
                    assert names == ['bytes', 'crc32c'], (path, names)
            assert np.array_equal(g['state/sparse'][1090:1100, 3:7], expected('sparse')[0].view(np.float32)
                                  .reshape(1100, 1024)[1090:1100, 3:7])
    """,
        zstd=compressed["zstd"],
        blosc=compressed["blosc"],
        lz4=compressed["lz4"],
        exp=compressed["exp"],
    )


def test_tensorstore_alone_decodes_zstd_and_blosc_checkpoints(compressed):
    out = run_alone(
        """
        import tensorstore as ts
        n = 0
        for ckpt in [ZSTD, BLOSC, LZ4]:
            for path in ['sparse', 'ramp', 'i64', 'bf16', 'random']:
                spec = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': ckpt + '/state/' + path}}
                t = ts.open(spec, open=True).result()
                same(t.read().result(), path); n += 1
        print(n)
    """,
        zstd=compressed["zstd"],
        blosc=compressed["blosc"],
        lz4=compressed["lz4"],
        exp=compressed["exp"],
    )
    assert "15" in out
