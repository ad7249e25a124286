"""HDF5 and NPZ export, read back by h5py or numpy alone (subprocesses that never import
computable_flows_shim), and the analysis commands of the CLI: diff, tree, plot, export, show."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from computable_flows_shim import CheckpointCorruptError, CheckpointManager, ExportError, export_checkpoint
from computable_flows_shim.cli._main import main

STATE = {
    "x": np.arange(24.0).reshape(2, 3, 4),
    "big": np.arange(2 * 1024 * 1024, dtype=np.float32).reshape(2048, 1024),  # 2 chunks
    "c": np.array([1 + 2j, -3j], np.complex64),
    "b": np.array([True, False]),
    "u64": np.array([2**64 - 1], np.uint64),
    "scalar": np.float64(-0.0),
    "empty": np.zeros((0, 3), np.int32),
    "nested": {"a/b": np.arange(5, dtype=np.int16), "lr": 0.5},
    "bf": jnp.arange(5, dtype=jnp.bfloat16),
    "i4": np.arange(-4, 4).astype(ml_dtypes.int4),
    "key": jax.random.key(7),
}
HIST = {
    "iter": np.arange(0, 50, 10),
    "E": np.linspace(5, 1, 5),
    "phase": ["RED", "AMBER", "GREEN", "GREEN", "GREEN"],
    "note": ["", "é", "x" * 70000, "", "z"],
    "events": [{"type": "RUN_STARTED", "iter": 0, "payload": {"seed": 1}}],
}
# stored path -> (raw bytes as exported, dtype name exported, extension type name)
EXPECTED = {
    "state/x": STATE["x"],
    "state/big": STATE["big"],
    "state/c": STATE["c"],
    "state/b": STATE["b"],
    "state/u64": STATE["u64"],
    "state/scalar": np.asarray(STATE["scalar"]),
    "state/empty": STATE["empty"],
    "state/nested/a%2Fb": STATE["nested"]["a/b"],
    "state/bf": np.asarray(STATE["bf"]).view(np.uint16),
    "state/i4": STATE["i4"].view(np.uint8),
    "state/key": np.asarray(jax.random.key_data(STATE["key"])),
    "telemetry/iter": HIST["iter"],
    "telemetry/E": HIST["E"],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    mgr = CheckpointManager(d / "store", durable=False)
    cid = mgr.create_checkpoint("exp", 3, STATE, {"lam": 0.01, "nested": {"k": [1, 2]}}, HIST, {"gamma": 0.5})
    exp = d / "expected"
    exp.mkdir()
    for name, a in EXPECTED.items():
        np.save(exp / (name.replace("/", "__") + ".npy"), a)
    h5 = export_checkpoint(mgr, cid, d / "out.h5")
    npz = export_checkpoint(mgr, cid, str(d / "out.npz"))
    return {"mgr": mgr, "cid": cid, "h5": h5, "npz": npz, "exp": str(exp), "dir": d}


def run_alone(code: str, **paths) -> None:
    prelude = "".join(f"{k.upper()} = {v!r}\n" for k, v in paths.items()) + textwrap.dedent("""
        import json, os, sys
        import numpy as np
        def expected():
            for f in sorted(os.listdir(EXP)):
                yield f[:-4].replace('__', '/'), np.load(os.path.join(EXP, f))
        def same(got, want, name):
            got = np.asarray(got)
            assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype, got.shape)
            assert got.tobytes() == want.tobytes(), name
    """)
    tail = "\nassert 'computable_flows_shim' not in sys.modules\nprint('OK')\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code) + tail],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


def test_h5py_alone_reads_the_hdf5_export(exported):
    run_alone(
        """
        import h5py
        with h5py.File(H5, 'r') as f:
            n = 0
            for name, want in expected():
                same(f[name][()], want, name); n += 1
            assert n == 13
            assert f.attrs['checkpoint_id'] == 'exp-i000000000003' and f.attrs['iteration'] == 3
            assert json.loads(f.attrs['flow_config']) == {'lam': 0.01, 'nested': {'k': [1, 2]}}
            assert json.loads(f.attrs['certificates']) == {'gamma': 0.5}
            pytree = json.loads(f.attrs['pytree'])
            assert pytree['kind'] == 'dict' and 'nested' in pytree['keys']
            assert f['state/bf'].attrs['cfs_dtype'] == 'bfloat16'
            assert f['state/key'].attrs['cfs_prng_key_impl'] == 'threefry2x32'
            assert f['state/nested/a%2Fb'].attrs['key_path'] == "state['nested']['a/b']"
            assert json.loads(f['state/x'].attrs['dimension_names']) == ['x.d0', 'x.d1', 'x.d2']
            assert list(f['telemetry/phase'].asstr()[()]) == ['RED', 'AMBER', 'GREEN', 'GREEN', 'GREEN']
            assert list(f['telemetry/note'].asstr()[()]) == ['', 'é', 'x' * 70000, '', 'z']
            assert list(f['telemetry/event_type'].asstr()[()]) == ['RUN_STARTED']
            assert json.loads(f['telemetry/event_payload'].asstr()[0]) == {'seed': 1}
        """,
        h5=exported["h5"],
        exp=exported["exp"],
    )


def test_numpy_alone_reads_the_npz_export_without_pickle(exported):
    run_alone(
        """
        z = np.load(NPZ, allow_pickle=False)
        n = 0
        for name, want in expected():
            same(z[name], want, name); n += 1
        assert n == 13
        attrs = json.loads(str(z['__cfs_attrs__']))
        assert attrs['checkpoint']['run_id'] == 'exp' and attrs['checkpoint']['flow_config']['lam'] == 0.01
        assert attrs['arrays']['state/bf']['cfs_dtype'] == 'bfloat16'
        assert attrs['arrays']['state/key']['cfs_prng_key_impl'] == 'threefry2x32'
        assert list(z['telemetry/phase']) == ['RED', 'AMBER', 'GREEN', 'GREEN', 'GREEN']
        assert list(z['telemetry/note']) == ['', 'é', 'x' * 70000, '', 'z']
        for name in z.files:
            assert z[name].dtype != object, name
        """,
        npz=exported["npz"],
        exp=exported["exp"],
    )


def test_export_refuses_unknown_formats_and_existing_files(exported):
    mgr, cid, d = exported["mgr"], exported["cid"], exported["dir"]
    with pytest.raises(ExportError, match="use a .h5, .hdf5 or .npz"):
        export_checkpoint(mgr, cid, d / "out.csv")
    with pytest.raises(ExportError, match="already exists"):
        export_checkpoint(mgr, cid, exported["h5"])
    before = os.path.getmtime(exported["npz"])
    export_checkpoint(mgr, cid, d / "again.hdf5")
    assert os.path.exists(d / "again.hdf5") and os.path.getmtime(exported["npz"]) == before
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_export_of_a_damaged_checkpoint_fails_and_leaves_no_file(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", durable=False)
    cid = mgr.create_checkpoint("r", 1, {"big": STATE["big"]})
    chunk = os.path.join(mgr.checkpoint_path(cid), "state", "big", "c.1.0")
    with open(chunk, "r+b") as f:
        f.write(b"\xff\xff")
    for name in ("bad.h5", "bad.npz"):
        with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
            export_checkpoint(mgr, cid, tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == ["s"]


# ---------------------------------------------------------------- CLI


@pytest.fixture
def cli_store(tmp_path):
    mgr = CheckpointManager(tmp_path / "store", durable=False)
    for it in (10, 20):
        h = {"iter": np.arange(1, it + 1), "E": 1.0 / np.arange(1, it + 1), "phase": ["GREEN"] * it}
        h["grad_norm"] = h["E"] ** 2
        mgr.create_checkpoint("r", it, {"x": np.full(8, float(it)), "big": STATE["big"]}, {}, h)
    mgr.rollback_to_checkpoint("r-i000000000010", "r-b")
    return str(tmp_path / "store")


def test_cli_diff_tree_plot_export_show(cli_store, tmp_path, capsys):
    assert main(["--store", cli_store, "diff", "r-i000000000010", "r-b-i000000000010"]) == 0
    out = capsys.readouterr().out
    assert "2 leaves: 2 identical, 0 differ" in out and "lineage" in out

    assert main(["--store", cli_store, "diff", "r-i000000000010", "r-i000000000020", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    x = next(leaf for leaf in doc["leaves"] if leaf["leaf"] == "state['x']")
    assert (x["status"], x["changed_elements"], x["max_abs_diff"]) == ("changed", 8, 10.0)

    assert main(["--store", cli_store, "tree"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "r  (2 checkpoints, iterations 10..20, E=0.05)",
        "└── r-b  (from r-i000000000010, 1 checkpoint, iteration 10, E=0.1)",
    ]
    assert main(["--store", cli_store, "tree", "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["parent_run_id"]) for r in tree] == [("r", None), ("r-b", "r")]

    png = tmp_path / "energy.png"
    assert main(["--store", cli_store, "plot", "r", "r-b", "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["--store", cli_store, "plot", "r", "-o", str(png), "--columns", "nope"]) == 2
    assert "no telemetry column" in capsys.readouterr().err

    out_h5 = tmp_path / "r.h5"
    assert main(["--store", cli_store, "export", "r-i000000000020", str(out_h5)]) == 0
    assert main(["--store", cli_store, "export", "r-i000000000020", str(out_h5)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["--store", cli_store, "export", "r-i000000000020", str(out_h5), "--force"]) == 0
    import h5py

    with h5py.File(out_h5) as f:
        assert f["state/x"][0] == 20.0

    capsys.readouterr()
    assert main(["--store", cli_store, "show", "r-b-i000000000010"]) == 0
    out = capsys.readouterr().out
    assert "on disk:" in out and "hard-linked with other checkpoints" in out
    assert "(1024, 1024)" in out and "2x1 = 2" in out and "8.0 MiB" in out
    assert main(["--store", cli_store, "show", "r-i000000000020", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    big = next(leaf for leaf in doc["leaves"] if leaf["leaf"] == "state['big']")
    assert (big["chunks"], big["grid"], big["nchunks"]) == ([1024, 1024], [2, 1], 2)
    assert big["disk_bytes"] > big["bytes"] == STATE["big"].nbytes
    assert doc["disk"]["bytes"] > STATE["big"].nbytes
