"""Analysis at scale: a dask-distributed LocalCluster (real worker processes) reduces a
checkpoint's leaves lazily: the client builds the graph from metadata alone, each worker
task reads and checks one stored chunk, and the result equals numpy's."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from computable_flows_shim import CheckpointManager

distributed = pytest.importorskip("distributed")


def test_local_cluster_reduces_leaves_lazily(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "w": rng.standard_normal((1500, 1000)),  # 12 MB: 3 slab chunks
        "layers": [rng.standard_normal((600, 1000)).astype(np.float32) for _ in range(3)],  # one chunk each
        "step": np.int64(7),
    }
    mgr = CheckpointManager(tmp_path / "store")
    cid = mgr.create_checkpoint("big", 1, state)

    opened: list[str] = []
    active = [True]

    def audit(event: str, args: tuple) -> None:
        if active[0] and event == "open" and isinstance(args[0], str) and "/state/" in args[0] and "/c." in args[0]:
            opened.append(args[0])

    sys.addaudithook(audit)  # cannot be removed: switched off below
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        view = mgr.open_checkpoint(cid)
        leaves = [view.state["w"], *view.state["layers"]]
        arrays = [leaf.to_dask() for leaf in leaves]
        total = sum(a.astype(np.float64).sum() for a in arrays) + sum((a.astype(np.float64) ** 2).sum() for a in arrays)
        nchunks = sum(a.npartitions for a in arrays)
        assert nchunks == 3 + 3  # w: three 4 MiB slabs; each layer (2.4 MB) one chunk
        with distributed.get_task_stream(client) as ts:
            got = client.compute(total).result()
        workers = {t["worker"] for t in ts.data}
    active[0] = False
    expected = sum(np.sum(x, dtype=np.float64) for x in [state["w"], *state["layers"]]) + sum(
        np.sum(np.asarray(x, np.float64) ** 2) for x in [state["w"], *state["layers"]]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert [p for p in opened if str(tmp_path) in p] == []  # the client read no chunk: the workers did
    assert workers and all(w.startswith("tcp://") for w in workers)
    assert len(ts.data) >= nchunks


def test_local_cluster_reduces_an_s3_checkpoint_through_zarr(s3_url):
    """An object-store checkpoint on the cluster: the workers open the committed group at its
    URL with zarr's own ObjectStore (no code of this package on the read path)."""
    da = pytest.importorskip("dask.array")
    import zarr
    from obstore.store import from_url
    from zarr.storage import ObjectStore as ZarrObjectStore

    w = np.random.default_rng(1).standard_normal((1500, 1000))
    mgr = CheckpointManager(s3_url)
    cid = mgr.create_checkpoint("s3", 1, {"w": w})
    store = ZarrObjectStore(from_url(mgr.checkpoint_path(cid), client_options={"allow_http": True}), read_only=True)
    arr = da.from_zarr(zarr.open_array(store, path="state/w", mode="r"))
    assert arr.npartitions == 3
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        with distributed.get_task_stream(client) as ts:
            got = client.compute((arr**2).sum()).result()
    np.testing.assert_allclose(got, np.sum(w**2), rtol=1e-12)
    assert {t["worker"] for t in ts.data}
