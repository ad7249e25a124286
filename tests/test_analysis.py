"""Analysis views: dask/xarray state through the verified reader, run telemetry as one
Dataset, lineage, diff, leaf descriptions, notebook displays and plots."""

import json
import math
import os
import tracemalloc

import dask
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import xarray as xr

from computable_flows_shim import (
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointNotFoundError,
    describe_leaves,
    diff_checkpoints,
    format_run_tree,
    list_runs,
    open_run,
    open_telemetry,
    plot_telemetry,
    state_dataset,
    state_datatree,
)

BIG = np.arange(2048 * 1024, dtype=np.float32).reshape(2048, 1024)  # 8 MiB: 2 chunks of 4 MiB


def state(step: int = 0) -> dict:
    return {
        "x": np.linspace(0, 1, 100) + step,
        "big": BIG,
        "opt": {"w": np.ones((3, 4), np.float32) * step, "lr": 0.1, "none": None},
        "bf": jnp.arange(4, dtype=jnp.bfloat16),
        "i4": np.arange(-2, 2).astype(ml_dtypes.int4),
        "key": jax.random.key(step),
        "empty": np.zeros((0, 3)),
    }


def history(n: int, start: int = 1, phase: str = "GREEN", extra: bool = False) -> dict:
    its = np.arange(start, start + n)
    h = {
        "iter": its,
        "E": 10.0 / its,
        "grad_norm": 1.0 / its**2,
        "phase": [phase] * n,
        "events": [{"type": "RUN_STARTED", "iter": start}],
    }
    if extra:
        h["sparsity_wx"] = np.full(n, 0.5)
    return h


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """runs a (0, 10, 20), a-branch from a@10 (then 30), b (0, 10): no flow needed."""
    mgr = CheckpointManager(tmp_path_factory.mktemp("analysis") / "store", durable=False)
    for it in (0, 10, 20):
        mgr.create_checkpoint("a", it, state(it), {"lam": 0.01}, history(max(it, 1)), {"gamma": 0.5})
    mgr.rollback_to_checkpoint("a-i000000000010", "a-branch")
    mgr.create_checkpoint("a-branch", 30, state(30), {"lam": 0.01}, history(30, phase="AMBER"), {"gamma": 0.5})
    for it in (0, 10):
        mgr.create_checkpoint("b", it, state(it), {"lam": 0.03}, history(max(it, 1), phase="RED", extra=True))
    return mgr


# ---------------------------------------------------------------- dask / xarray state


def test_state_dataset_is_lazy_with_one_dask_chunk_per_stored_chunk(store):
    view = store.open_checkpoint("a-i000000000020")
    ds = view.to_xarray()
    assert isinstance(ds, xr.Dataset)
    assert ds["big"].dims == ("big.d0", "big.d1") and ds["opt/w"].dims == ("opt/w.d0", "opt/w.d1")
    big = ds["big"].data
    assert isinstance(big, dask.array.Array)
    assert big.numblocks == (2, 1) and big.chunks == ((1024, 1024), (1024,))  # the stored (1024, 1024) chunks
    assert float(ds["big"].sum()) == float(BIG.astype(np.float64).sum())
    np.testing.assert_array_equal(ds["x"].values, state(20)["x"])
    assert ds["bf"].dtype == ml_dtypes.bfloat16 and ds["i4"].dtype == ml_dtypes.int4
    np.testing.assert_array_equal(ds["i4"].values, np.arange(-2, 2).astype(ml_dtypes.int4))
    assert ds["key"].attrs["cfs_prng_key_impl"] == "threefry2x32"
    np.testing.assert_array_equal(ds["key"].values, jax.random.key_data(jax.random.key(20)))
    assert ds["opt/lr"].values == 0.1 and ds["opt/lr"].attrs["kind"] == "scalar"
    assert ds["empty"].shape == (0, 3)
    assert ds.attrs["checkpoint_id"] == "a-i000000000020" and json.loads(ds.attrs["flow_config"]) == {"lam": 0.01}
    assert ds["opt/w"].attrs["key_path"] == "state['opt']['w']"


def test_state_dataset_takes_dimension_names_of_your_own(store):
    ds = state_dataset(store.open_checkpoint("a-i000000000020"), {"big": ["row", "col"]})
    assert ds["big"].dims == ("row", "col")
    assert float(ds["big"].isel(row=1, col=2)) == float(BIG[1, 2])
    with pytest.raises(ValueError, match="2 names needed"):
        state_dataset(store.open_checkpoint("a-i000000000020"), {"big": ["row"]})


def test_reductions_run_out_of_core_chunk_by_chunk(tmp_path):
    """A 64 MiB leaf (16 chunks) is summed holding a few chunks, not the leaf."""
    mgr = CheckpointManager(tmp_path / "s", durable=False)
    leaf = np.ones((16, 1024, 1024), np.float32)
    cid = mgr.create_checkpoint("big", 0, {"w": leaf})
    del leaf
    ds = mgr.open_checkpoint(cid).to_xarray()
    tracemalloc.start()
    try:
        total = float(ds["w"].sum().compute(scheduler="synchronous"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 16 * 1024 * 1024
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB for a 64 MiB leaf"


def test_dask_views_refuse_damage_instead_of_reading_zeros(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", durable=False)
    cid = mgr.create_checkpoint("r", 1, {"big": BIG})
    chunk1 = os.path.join(mgr.checkpoint_path(cid), "state", "big", "c.1.0")
    with open(chunk1, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0x40]))
    ds = mgr.open_checkpoint(cid).to_xarray()
    assert float(ds["big"][:1024].sum()) == float(BIG[:1024].astype(np.float64).sum())  # chunk 0 is fine
    with pytest.raises(CheckpointCorruptError, match=r"leaf state\['big'\], chunk 'c.1.0': checksum mismatch"):
        ds["big"].sum().compute()
    os.unlink(chunk1)
    with pytest.raises(CheckpointCorruptError, match="chunk file missing"):
        mgr.open_checkpoint(cid).state["big"].to_dask().max().compute()


def test_datatree_follows_the_stored_groups(store):
    tree = state_datatree(store.open_checkpoint("a-i000000000020"))
    assert isinstance(tree, xr.DataTree)
    assert set(tree["opt"].data_vars) == {"w"} and tree["opt"]["w"].dims == ("opt/w.d0", "opt/w.d1")
    assert float(tree["opt"]["w"].sum()) == 12 * 20.0
    assert "big" in tree.data_vars and tree.attrs["run_id"] == "a"


def test_lazy_array_to_dask_matches_numpy(store):
    lazy = store.open_checkpoint("a-i000000000010").state["big"]
    arr = lazy.to_dask()
    assert arr.shape == BIG.shape and arr.numblocks == (2, 1)
    np.testing.assert_array_equal(arr[1000:1100:7, ::100].compute(), BIG[1000:1100:7, ::100])


# ---------------------------------------------------------------- telemetry


def test_open_telemetry_concatenates_runs_along_iter(store):
    ds = open_telemetry(store, ["a", "a-branch", "b"])
    assert ds.attrs["runs"] == ["a", "a-branch", "b"]
    assert ds.sizes["iter"] == 20 + 30 + 10
    assert list(np.unique(ds["run"].values)) == ["a", "a-branch", "b"]
    branch = ds.where(ds["run"] == "a-branch", drop=True)
    assert list(branch["iter"].values) == list(range(1, 31)) and set(branch["phase"].values) == {"AMBER"}
    # a column only b has is NaN elsewhere
    assert np.isnan(ds["sparsity_wx"].where(ds["run"] == "a", drop=True).values).all()
    assert (ds["sparsity_wx"].where(ds["run"] == "b", drop=True).values == 0.5).all()
    assert list(ds["event_run"].values) == ["a", "a-branch", "b"]
    assert list(ds["event_type"].values) == ["RUN_STARTED"] * 3
    parts = dict(ds.groupby("run"))
    assert parts["b"].sizes["iter"] == 10


def test_open_telemetry_takes_checkpoint_ids_and_defaults_to_every_run(store):
    one = open_telemetry(store, "a-i000000000010")
    assert one.sizes["iter"] == 10 and set(one["run"].values) == {"a"}
    every = open_telemetry(store)
    assert every.attrs["runs"] == ["a", "a-branch", "b"]
    with pytest.raises(CheckpointNotFoundError):
        open_telemetry(store, ["nope"])


# ---------------------------------------------------------------- lineage


def test_runs_and_their_lineage(store):
    runs = {r.run_id: r for r in list_runs(store)}
    assert set(runs) == {"a", "a-branch", "b"}
    assert runs["a"].children == ("a-branch",) and runs["a"].parent_run_id is None
    br = runs["a-branch"]
    assert (br.parent_run_id, br.branched_from, br.branch_iteration) == ("a", "a-i000000000010", 10)
    assert [c.iteration for c in br.checkpoints] == [10, 30] and br.latest.checkpoint_id == "a-branch-i000000000030"
    tree = format_run_tree(list(runs.values()))
    lines = tree.splitlines()
    assert lines[0].startswith("a  (3 checkpoints, iterations 0..20")
    assert lines[1].startswith("└── a-branch  (from a-i000000000010, 2 checkpoints")
    assert lines[2].startswith("b  (")
    assert open_run(store, "b").last_iteration == 10
    with pytest.raises(CheckpointNotFoundError):
        open_run(store, "zzz")


def test_a_branch_whose_parent_run_is_gone_is_a_root(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", durable=False)
    mgr.create_checkpoint("p", 1, {"x": np.zeros(2)})
    mgr.rollback_to_checkpoint("p-i000000000001", "c")
    mgr.delete_checkpoint("p-i000000000001")
    (run,) = list_runs(mgr)
    assert run.parent_run_id == "p"
    assert format_run_tree([run]) == "c  (from p-i000000000001 (parent run not in store), 1 checkpoint, iteration 1)"


# ---------------------------------------------------------------- diff


def test_diff_of_two_iterations(store):
    d = diff_checkpoints(store, "a-i000000000010", "a-i000000000020")
    by = {leaf.name: leaf for leaf in d.leaves}
    assert not d.identical
    assert by["state['x']"].status == "changed" and by["state['x']"].changed_elements == 100
    assert by["state['x']"].max_abs_diff == pytest.approx(10.0)
    assert by["state['big']"].status == "identical" and by["state['big']"].chunks_read == 0  # hard-linked
    assert by["state['opt']['w']"].max_abs_diff == 10.0
    assert by["state['opt']['lr']"].status == "identical"
    assert by["state['key']"].status == "changed"
    assert by["state['empty']"].status == "identical"
    assert d.attrs["iteration"] == (10, 20)
    doc = d.to_dict()
    json.dumps(doc, allow_nan=False)
    assert doc["identical"] is False and {leaf["status"] for leaf in doc["leaves"]} == {"changed", "identical"}
    text = d.format()
    assert "state['x']" in text and "changed" in text and "iteration: 10 -> 20" in text
    assert "<table>" in d._repr_html_()


def test_diff_of_a_rollback_reads_nothing_and_finds_it_identical(store):
    d = diff_checkpoints(store, "a-i000000000010", "a-branch-i000000000010")
    assert len(d.leaves) == 8  # every leaf of state(): identical and all() below say nothing of no leaves
    assert d.identical and all(leaf.chunks_read == 0 for leaf in d.leaves)
    assert set(d.attrs) == {"run_id", "lineage"}


def test_diff_reports_shape_dtype_kind_and_missing_leaves(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", durable=False)
    a = mgr.create_checkpoint(
        "d",
        1,
        {
            "s": np.zeros(3),
            "t": np.zeros(3, np.float32),
            "k": np.zeros(2),
            "gone": np.ones(1),
            "n": np.array([np.nan, 1.0, -0.0]),
            "p": 1.5,
        },
    )
    b = mgr.create_checkpoint(
        "d",
        2,
        {
            "s": np.zeros(4),
            "t": np.zeros(3, np.float64),
            "k": 3,
            "new": np.ones(1),
            "n": np.array([np.nan, 1.0, 0.0]),
            "p": 2.5,
        },
    )
    by = {leaf.name: leaf for leaf in diff_checkpoints(mgr, a, b).leaves}
    assert (by["state['s']"].status, by["state['s']"].shape_a, by["state['s']"].shape_b) == (
        "shape changed",
        (3,),
        (4,),
    )
    assert (by["state['t']"].status, by["state['t']"].dtype_a, by["state['t']"].dtype_b) == (
        "dtype changed",
        "float32",
        "float64",
    )
    assert by["state['k']"].status == "kind changed"
    assert by["state['gone']"].status == "only in a" and by["state['new']"].status == "only in b"
    n = by["state['n']"]  # NaN equals the same NaN; -0.0 and 0.0 differ in their bits
    assert (n.status, n.changed_elements, n.max_abs_diff) == ("changed", 1, 0.0)
    assert (by["state['p']"].status, by["state['p']"].max_abs_diff) == ("changed", 1.0)
    assert list(by) == [
        "state['s']",
        "state['t']",
        "state['k']",
        "state['gone']",
        "state['n']",
        "state['p']",
        "state['new']",
    ]


def test_diff_gives_nan_where_one_side_is_nan(tmp_path):
    mgr = CheckpointManager(tmp_path / "s", durable=False)
    a = mgr.create_checkpoint("n", 1, {"v": np.array([1.0, 2.0])})
    b = mgr.create_checkpoint("n", 2, {"v": np.array([np.nan, 2.5])})
    (leaf,) = diff_checkpoints(mgr, a, b).leaves
    assert leaf.changed_elements == 2 and math.isnan(leaf.max_abs_diff)
    assert leaf.to_dict()["max_abs_diff"] == "NaN"


# ---------------------------------------------------------------- describe and display


def test_describe_leaves_gives_layout_and_bytes(store):
    leaves = {leaf.name: leaf for leaf in describe_leaves(store.open_checkpoint("a-i000000000020"))}
    big = leaves["state['big']"]
    assert (big.chunk_shape, big.grid, big.nchunks, big.nbytes) == ((1024, 1024), (2, 1), 2, BIG.nbytes)
    assert big.disk_bytes > BIG.nbytes  # + CRC trailers and zarr.json
    assert leaves["state['opt']['lr']"].kind == "scalar" and leaves["state['opt']['lr']"].value == 0.1
    assert leaves["state['key']"].key_impl == "threefry2x32"
    assert leaves["state['empty']"].nchunks == 0
    assert leaves["state['big']"].to_dict()["path"] == "state/big"


def test_checkpoint_view_displays(store, tmp_path):
    view = store.open_checkpoint("a-branch-i000000000010")
    html = view._repr_html_()
    for needed in (
        "a-branch-i000000000010",
        "state[&#x27;big&#x27;]",
        "(2048, 1024)",
        "(1024, 1024)",
        "bfloat16",
        "8.0 MiB",
        "Telemetry summary",
        "branched from",
        "a-i000000000010",
        "<details",
    ):
        assert needed in html, needed
    text = repr(view)
    assert text.startswith("<CheckpointView a-branch-i000000000010>")
    assert "state['big']" in text and "(2048, 1024)" in text and "2x1 (2)" in text
    assert "lineage: branched from a-i000000000010 (run a, iteration 10)" in text
    # everything shown is escaped
    mgr = CheckpointManager(tmp_path / "s", durable=False)
    cid = mgr.create_checkpoint("h", 1, {"<script>": np.zeros(1)}, metadata={"note": "<b>bold</b>"})
    html = mgr.open_checkpoint(cid)._repr_html_()
    assert "<script>" not in html and "<b>bold" not in html and "&lt;script&gt;" in html


def test_run_and_store_displays(store):
    run = open_run(store, "a-branch")
    assert "branched from <b>a-i000000000010</b>" in run._repr_html_()
    assert repr(run).startswith("<Run a-branch: 2 checkpoints, iterations 10..30>")
    html = store._repr_html_()
    assert "3 runs · 7 checkpoints" in html and "└── " in html and "AMBER 30" in html
    from IPython.lib.pretty import pretty

    text = pretty(store)
    assert text.startswith("CheckpointManager(") and "3 runs, 7 checkpoints" in text and "└── a-branch" in text
    assert repr(store).count("\n") == 0  # repr stays one line: messages use it


# ---------------------------------------------------------------- plots


def test_plot_telemetry_writes_a_png(store, tmp_path):
    out = tmp_path / "energy.png"
    fig = plot_telemetry(store, ["a", "a-branch", "b"], path=out, title="runs")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 3 and fig.axes[0].get_yscale() == "linear" and fig.axes[1].get_yscale() == "log"
    assert [t.get_text() for t in fig.axes[2].get_yticklabels()] == ["a", "a-branch", "b"]
    fig2 = plot_telemetry(open_telemetry(store, "b"), columns=["sparsity_wx"], path=tmp_path / "s.svg")
    assert len(fig2.axes) == 1 and (tmp_path / "s.svg").stat().st_size > 0
    with pytest.raises(ValueError, match="no telemetry column"):
        plot_telemetry(store, "a", columns=["nope"])
