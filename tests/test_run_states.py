"""A run as a dataset (issue: states across checkpoints): ``open_run_states`` on one run,
several runs with a branch, a local and an S3 store; metadata only at open, each distinct
chunk read once per computation (counted opens), damage raised inside dask; the convergence
helpers against numpy; ``plot_states`` and ``cfs plot RUN --state LEAF``."""

from __future__ import annotations

import os

import dask
import jax
import numpy as np
import pytest
import xarray as xr

from computable_flows_shim import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    distance_to,
    open_run_states,
    plot_states,
    successive_change,
    telemetry_at_checkpoints,
)
from computable_flows_shim.cli._main import main

BIG = np.arange(2048 * 1024, dtype=np.float32).reshape(2048, 1024)  # 8 MiB: 2 chunks, never changes


def state(it: int) -> dict:
    rng = np.random.default_rng(it)
    return {
        "x": rng.standard_normal((6, 5)) / (1 + it),
        "big": BIG,
        "n": np.arange(3, dtype=np.int64) + it,
        "key": jax.random.key(it),
        "lr": 0.1,  # a Python scalar: not an array leaf
    }


def history(n: int) -> dict:
    its = np.arange(1, n + 1)
    return {"iter": its, "E": 10.0 / its, "phase": ["GREEN"] * n}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """run ``a`` at 0, 10, 20; ``a-b`` rolled back from a@10, then 30."""
    root = str(tmp_path_factory.mktemp("states") / "store")
    mgr = CheckpointManager(root, durable=False, pack_max_bytes=0)  # the tests count each leaf's chunk files
    for it in (0, 10, 20):
        mgr.create_checkpoint("a", it, state(it), {}, history(max(it, 1)))
    mgr.rollback_to_checkpoint("a-i000000000010", "a-b")
    mgr.create_checkpoint("a-b", 30, state(30), {}, history(30))
    return mgr


class Opens:
    """Every ``os.open`` of a chunk file (any file but a ``zarr.json``), by path."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []
        real = os.open

        def spy(path, *a, **k):
            if os.path.basename(os.fspath(path)) != "zarr.json":
                self.paths.append(os.fspath(path))
            return real(path, *a, **k)

        monkeypatch.setattr(os, "open", spy)

    def take(self) -> list[str]:
        out, self.paths = self.paths, []
        return out


def _inode(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _chunk_files(mgr: CheckpointManager, ids) -> list[str]:
    out = []
    for cid in ids:
        for base, _dirs, files in os.walk(os.path.join(mgr.checkpoint_path(cid), "state")):
            out += [os.path.join(base, f) for f in files if f != "zarr.json"]
    return out


# ---------------------------------------------------------------- one run, several runs


def test_one_run_is_a_lazy_dataset_along_iteration(store):
    ds = open_run_states(store, "a")
    assert list(ds.data_vars) == ["x", "big", "n", "key"]  # array leaves in tree order; "lr" is a scalar
    assert ds["x"].dims == ("iteration", "x.d0", "x.d1") and "run" not in ds.dims
    assert ds["iteration"].values.tolist() == [0, 10, 20]
    assert ds["checkpoint"].values.tolist() == ["a-i000000000000", "a-i000000000010", "a-i000000000020"]
    assert ds["big"].chunks == ((1, 1, 1), (1024, 1024), (1024,))  # one dask chunk per stored chunk
    assert ds["n"].dtype == np.int64 and ds["key"].attrs["cfs_prng_key_impl"] == "threefry2x32"
    for it in (0, 10, 20):
        ck = store.load_checkpoint(f"a-i{it:012d}")["state"]
        got = ds.sel(iteration=it)
        np.testing.assert_array_equal(got["x"].values, ck["x"])
        np.testing.assert_array_equal(got["n"].values, ck["n"])
        np.testing.assert_array_equal(got["key"].values, jax.random.key_data(ck["key"]))
    np.testing.assert_array_equal(ds["big"].isel(iteration=1).values, BIG)
    only = open_run_states(store, "a", "x", dims={"x": ["row", "col"]})
    assert list(only.data_vars) == ["x"] and only["x"].dims == ("iteration", "row", "col")


def test_opening_reads_metadata_only_and_each_distinct_chunk_once(store, monkeypatch):
    opens = Opens(monkeypatch)
    ds = open_run_states(store, "a")
    assert opens.take() == []  # metadata only
    # distances and changes of every leaf in one computation: x, n and key differ in every
    # checkpoint (3 chunks each); big is one hard-linked pair of chunk files in all three
    dask.compute(distance_to(ds), successive_change(ds), ds["big"].sum())
    paths = opens.take()
    files = _chunk_files(store, ds["checkpoint"].values)
    distinct = {_inode(p) for p in files}
    assert len(files) == 3 * 5 and len(distinct) == 3 * 3 + 2
    assert len(paths) == len(distinct) and {_inode(p) for p in paths} == distinct  # each distinct chunk once
    # and again in a second computation (dask keeps no cache between computations)
    float(ds["big"].max())
    assert len(opens.take()) == 2


def test_several_runs_with_a_branch_share_the_parents_chunks(store, monkeypatch):
    ds = open_run_states(store, ["a", "a-b"])
    assert ds["x"].dims == ("run", "iteration", "x.d0", "x.d1")
    assert ds["run"].values.tolist() == ["a", "a-b"] and ds["iteration"].values.tolist() == [0, 10, 20, 30]
    assert ds["checkpoint"].values.tolist() == [
        ["a-i000000000000", "a-i000000000010", "a-i000000000020", ""],
        # the branch inherits its parent's checkpoints before the branch point (lineage)
        ["a-i000000000000", "a-b-i000000000010", "", "a-b-i000000000030"],
    ]
    x = ds["x"].values
    np.testing.assert_array_equal(x[1, 0], state(0)["x"])
    np.testing.assert_array_equal(x[1, 1], state(10)["x"])  # the rollback's checkpoint: a's state at 10
    np.testing.assert_array_equal(x[1, 3], state(30)["x"])
    assert np.isnan(x[0, 3]).all() and np.isnan(x[1, 2]).all()  # holes
    # an integer leaf with holes holds NaN as float64, and says what it was stored as
    assert ds["n"].dtype == np.float64 and ds["n"].attrs["stored_dtype"] == "int64"
    assert ds["n"].values[1, 3].tolist() == [30.0, 31.0, 32.0]

    opens = Opens(monkeypatch)
    dask.compute(distance_to(ds), successive_change(ds))
    paths = opens.take()
    files = _chunk_files(store, {c for c in ds["checkpoint"].values.ravel() if c})
    distinct = {_inode(p) for p in files}
    # a-i0 is in both rows, a-b-i10 is hard links to a-i10: read once each
    assert len(files) == 5 * 5 and len(distinct) == 4 * 3 + 2
    assert len(paths) == len(distinct) and {_inode(p) for p in paths} == distinct

    own = open_run_states(store, "a-b", lineage=False)
    assert own["iteration"].values.tolist() == [10, 30]
    assert open_run_states(store, "a-b")["iteration"].values.tolist() == [0, 10, 30]


def test_a_damaged_chunk_raises_our_error_inside_the_computation(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", durable=False, pack_max_bytes=0)
    for it in (1, 2, 3):
        mgr.create_checkpoint("r", it, {"x": np.full(100, float(it)), "y": np.ones(10)})
    chunk = os.path.join(mgr.checkpoint_path("r-i000000000002"), "state", "x", "c.0")
    with open(chunk, "r+b") as f:
        f.write(b"\xff\xff")
    ds = open_run_states(mgr, "r")  # metadata only: nothing noticed yet
    assert float(ds["y"].sum()) == 30.0  # other leaves read fine
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint 'r-i000000000002', leaf .*'x'.*checksum mismatch"):
        distance_to(ds["x"]).compute()
    os.remove(chunk)
    with pytest.raises(CheckpointCorruptError, match="r-i000000000002.*missing"):
        successive_change(open_run_states(mgr, "r")["x"]).compute()


def test_a_checkpoint_with_damaged_metadata_is_skipped_with_a_warning(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", durable=False)
    for it in (1, 2, 3):
        mgr.create_checkpoint("r", it, {"x": np.full(4, float(it))})
    root = os.path.join(mgr.checkpoint_path("r-i000000000002"), "zarr.json")
    with open(root, "r+b") as f:
        f.seek(20)
        f.write(b"#")
    with pytest.warns(CheckpointWarning, match="r-i000000000002"):
        ds = open_run_states(mgr, "r")
    assert ds["iteration"].values.tolist() == [1, 3]


def test_leaves_and_runs_that_do_not_exist_or_change_shape(store, tmp_path):
    with pytest.raises(ValueError, match=r"no array leaf \['nope'\].*'big', 'key', 'n', 'x'"):
        open_run_states(store, "a", ["x", "nope"])
    with pytest.raises(CheckpointNotFoundError, match="no checkpoints of run 'zz'"):
        open_run_states(store, "zz")
    mgr = CheckpointManager(tmp_path / "s", durable=False)
    mgr.create_checkpoint("r", 1, {"w": np.zeros(3), "v": np.zeros(2)})
    mgr.create_checkpoint("r", 2, {"w": np.zeros(4), "v": np.ones(2)})
    with pytest.raises(ValueError, match=r"leaf 'w' is \(3,\) float64.*but \(4,\) float64.*r-i000000000002"):
        open_run_states(mgr, "r")
    assert open_run_states(mgr, "r", "v")["v"].values.tolist() == [[0, 0], [1, 1]]


# ---------------------------------------------------------------- convergence helpers


def test_distances_and_changes_match_numpy(store):
    ds = open_run_states(store, "a", ["x"])
    x = np.stack([state(it)["x"] for it in (0, 10, 20)])
    d = distance_to(ds["x"])
    assert d.dims == ("iteration",) and d.chunks is not None  # lazy until asked
    np.testing.assert_allclose(d.values, [np.linalg.norm(x[i] - x[2]) for i in range(3)])
    np.testing.assert_allclose(
        distance_to(ds["x"], 10, norm="linf").values, [np.abs(x[i] - x[1]).max() for i in range(3)]
    )
    l1 = [np.abs(x[i] - x[0]).sum() for i in range(3)]
    np.testing.assert_allclose(distance_to(ds["x"], "first", norm="l1").values, l1)
    np.testing.assert_allclose(
        distance_to(ds["x"], norm="rms", relative=True).values,
        [np.sqrt(((x[i] - x[2]) ** 2).mean()) / np.sqrt((x[2] ** 2).mean()) for i in range(3)],
    )
    truth = np.zeros((6, 5))
    np.testing.assert_allclose(distance_to(ds["x"], truth).values, [np.linalg.norm(x[i]) for i in range(3)])
    ch = successive_change(ds["x"])
    np.testing.assert_allclose(ch.values, [np.nan, np.linalg.norm(x[1] - x[0]), np.linalg.norm(x[2] - x[1])])
    assert ch["previous_iteration"].values.tolist() == [-1, 0, 10]
    rel = successive_change(ds["x"], relative=True).values
    np.testing.assert_allclose(rel[1:], [np.linalg.norm(x[k] - x[k - 1]) / np.linalg.norm(x[k]) for k in (1, 2)])
    with pytest.raises(KeyError, match="no checkpoint at iteration 5"):
        distance_to(ds["x"], 5)
    with pytest.raises(ValueError, match="norm must be one of"):
        distance_to(ds["x"], norm="l3")


def test_per_run_references_and_holes_with_several_runs(store):
    ds = open_run_states(store, ["a", "a-b"], ["x"])
    x = {it: state(it)["x"] for it in (0, 10, 20, 30)}
    d = distance_to(ds["x"]).values  # each run to its own last checkpoint (20 and 30)
    np.testing.assert_allclose(d[0, :3], [np.linalg.norm(x[i] - x[20]) for i in (0, 10, 20)])
    np.testing.assert_allclose(d[1, [0, 1, 3]], [np.linalg.norm(x[i] - x[30]) for i in (0, 10, 30)])
    assert np.isnan(d[0, 3]) and np.isnan(d[1, 2])
    chosen = xr.DataArray([10, 0], dims="run", coords={"run": ["a", "a-b"]})
    e = distance_to(ds["x"], chosen).values
    np.testing.assert_allclose([e[0, 1], e[1, 0], e[1, 3]], [0.0, 0.0, np.linalg.norm(x[30] - x[0])])
    ch = successive_change(ds["x"])  # the branch's 30 is compared with its 10, across the hole
    assert ch["previous_iteration"].values.tolist() == [[-1, 0, 10, -1], [-1, 0, -1, 10]]
    np.testing.assert_allclose(ch.values[1, 3], np.linalg.norm(x[30] - x[10]))


def test_telemetry_at_the_checkpoint_iterations(store, tmp_path):
    tel = telemetry_at_checkpoints(store, open_run_states(store, "a", ["x"]))
    assert tel["E"].dims == ("iteration",)
    np.testing.assert_allclose(tel["E"].values, [np.nan, 1.0, 0.5])  # no sample at iteration 0
    both = telemetry_at_checkpoints(store, open_run_states(store, ["a", "a-b"], ["x"]), ["E"])
    np.testing.assert_allclose(both["E"].values, [[np.nan, 1.0, 0.5, np.nan], [np.nan, 1.0, np.nan, 10 / 30]])
    with pytest.raises(ValueError, match=r"no telemetry column\(s\) \['nope'\]"):
        telemetry_at_checkpoints(store, open_run_states(store, "a", ["x"]), ["nope"])
    # a resumed run's history may hold an iteration twice: its latest sample counts
    mgr = CheckpointManager(tmp_path / "s", durable=False)
    mgr.create_checkpoint("r", 2, {"x": np.zeros(2)}, {}, {"iter": [1, 2], "E": [5.0, 4.0]})
    mgr.create_checkpoint("r", 3, {"x": np.ones(2)}, {}, {"iter": [1, 2, 2, 3], "E": [5.0, 4.0, 3.5, 3.0]})
    np.testing.assert_allclose(telemetry_at_checkpoints(mgr, open_run_states(mgr, "r"))["E"].values, [3.5, 3.0])


# ---------------------------------------------------------------- object store


def test_open_run_states_on_s3_reads_each_distinct_object_once(s3_url):
    rng = np.random.default_rng(1)
    frozen = rng.standard_normal((700, 1000))  # 5.3 MiB: two chunks, server-side copies after the first save
    writer = CheckpointManager(s3_url, pack_max_bytes=0)
    xs = {it: rng.standard_normal(50) for it in range(1, 9)}  # 9 checkpoints in all: opened 16 at a time
    for it, x in xs.items():
        writer.create_checkpoint("r", it, {"frozen": frozen, "x": x})
    writer.rollback_to_checkpoint("r-i000000000002", "r-b")
    mgr = CheckpointManager(s3_url)  # a fresh mirror
    ds = open_run_states(mgr, ["r", "r-b"])
    assert ds["checkpoint"].values.tolist() == [
        [f"r-i{i:012d}" for i in range(1, 9)],
        ["r-i000000000001", "r-b-i000000000002"] + [""] * 6,
    ]
    before = mgr.store.objects_read
    d = distance_to(ds).compute()
    x = d["x"].values
    # the frozen leaf: 2 objects (the copies carry the same SHA-256); x: 8 distinct objects
    # (r-b's is a copy of r's at 2), where reading each block would read 2 * 10 + 10
    assert mgr.store.objects_read - before == 2 + 8
    np.testing.assert_allclose(x[0], [np.linalg.norm(xs[i] - xs[8]) for i in range(1, 9)])
    np.testing.assert_allclose(x[1, :2], [np.linalg.norm(xs[i] - xs[2]) for i in (1, 2)])
    np.testing.assert_array_equal(d["frozen"].values[0], np.zeros(8))
    np.testing.assert_array_equal(ds["frozen"].sel(run="r-b", iteration=2).values, frozen)
    # an object damaged in the bucket: our error, inside the computation
    rec = writer.store._committed("r-i000000000005")
    writer.store._put(f"{rec['data']}/state/x/c.0", b"\0" * (50 * 8 + 4))
    lazy = distance_to(open_run_states(CheckpointManager(s3_url), "r", "x"))
    with pytest.raises(CheckpointCorruptError, match="does not match the commit record"):
        lazy.compute()


# ---------------------------------------------------------------- pictures


def test_plot_states_draws_a_grid_and_the_curves(store, tmp_path):
    out = tmp_path / "grid.png"
    fig = plot_states(store, ["a", "a-b"], "x", path=out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 2 * 3  # two runs, three of the four iterations hold a checkpoint
    assert [ax.get_title() for ax in fig.axes[:4]] == [f"iteration {i}" for i in (0, 10, 20, 30)]
    curves = [ax for ax in fig.axes if ax.get_lines() and not ax.images]
    assert [ax.get_ylabel().split("\n")[0] for ax in curves] == [
        "l2 distance to",
        "l2 change from the",
        "energy E (telemetry)",
    ]
    # any leaf: the curves alone; chosen iterations; a Dataset source has no telemetry
    fig = plot_states(store, "a", "n", path=tmp_path / "n.svg")
    assert not [ax for ax in fig.axes if ax.images] and len(fig.axes) == 3
    fig = plot_states(open_run_states(store, "a", ["x"]), iterations=[0, 20])
    assert len([ax for ax in fig.axes if ax.images]) == 2 and len([a for a in fig.axes if a.get_lines()]) == 2
    with pytest.raises(ValueError, match=r"no checkpoint at iteration\(s\) \[5\]"):
        plot_states(store, "a", "x", iterations=[5])


def test_cli_plot_state(store, tmp_path, capsys):
    root = store.store.root
    png = tmp_path / "grid.png"
    assert main(["--store", root, "plot", "a", "--state", "x", "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and capsys.readouterr().out.strip() == str(png)
    args = ["--iterations", "0", "20", "--reference", "10", "--norm", "linf", "--columns", "E"]
    assert main(["--store", root, "plot", "a", "a-b", "--state", "x", *args, "-o", str(png)]) == 0
    capsys.readouterr()
    assert main(["--store", root, "plot", "a", "--state", "nope", "-o", str(png)]) == 2
    assert "no array leaf ['nope']" in capsys.readouterr().err
    assert main(["--store", root, "plot", "a", "--state", "x", "--reference", "5", "-o", str(png)]) == 2
    assert "no checkpoint at iteration 5" in capsys.readouterr().err
    energy = ["--columns", "E", "phase", "-o", str(tmp_path / "energy.png")]
    assert main(["--store", root, "plot", "a", *energy]) == 0  # telemetry, as before


def test_packed_leaves_along_a_run_and_a_branch(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", durable=False)  # small leaves packed (the default)
    for it in (1, 2, 3):
        mgr.create_checkpoint("r", it, {"w": np.full(8, it, np.float32), "c": np.float32(7), "big": np.zeros(20_000)})
    mgr.rollback_to_checkpoint("r-i000000000002", "r-b")
    assert "packed" in mgr.open_checkpoint("r-b-i000000000002").describe_leaves()[0].to_dict()["path"]
    ds = open_run_states(mgr, ["r", "r-b"])
    np.testing.assert_array_equal(ds["w"].values[0], [[1] * 8, [2] * 8, [3] * 8])
    np.testing.assert_array_equal(ds["w"].values[1, :2], [[1] * 8, [2] * 8])
    np.testing.assert_array_equal(ds["c"].values[0], [7, 7, 7])
    # the branch's checkpoint links its parent's pack files: its packed leaf is the same task
    sources = {k for k in dict(ds["w"].data.__dask_graph__()) if isinstance(k, str) and k.startswith("cfs-chunk-")}
    assert len(sources) == 3
    np.testing.assert_array_equal(successive_change(ds["w"]).values[0, 1:], [np.sqrt(8)] * 2)
