"""Every format version's golden checkpoint, committed to the repo, still reads bit-exactly."""

import os
import shutil
import sys

import jax
import numpy as np
from strategies import assert_tree_equal

from computable_flows_shim import CheckpointManager

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "golden"))
import make_golden_v1 as v1  # noqa: E402
import make_golden_v2 as v2  # noqa: E402
import make_golden_v3 as v3  # noqa: E402


def test_golden_v1_reads_bit_exactly(tmp_path):
    store = tmp_path / "v1"
    shutil.copytree(v1.STORE, store)  # never write into the committed copy
    mgr = CheckpointManager(store)
    assert [i.checkpoint_id for i in mgr.list_checkpoints()] == [v1.CHECKPOINT_ID]
    assert mgr.verify_checkpoint(v1.CHECKPOINT_ID).ok
    out = mgr.load_checkpoint(v1.CHECKPOINT_ID)
    state = out["state"]
    key = state["rng"].pop("key")
    assert str(jax.random.key_impl(key)) == "threefry2x32"
    state["rng"]["key_data"] = np.asarray(jax.random.key_data(key))
    assert_tree_equal(v1.expected_state(), state)
    assert out["iteration"] == 42 and out["run_id"] == "golden"
    assert out["flow_config"] == {"step_size": 0.1, "operator": "blur", "levels": 3}
    assert out["certificates"] == {"eta_dd": 0.8, "gamma": 0.05}
    hist = v1.expected_history()
    for k in ("iter", "E", "grad_norm"):
        assert out["telemetry"][k].tobytes() == np.asarray(hist[k]).tobytes()
    assert list(out["telemetry"]["phase"]) == hist["phase"]
    assert out["telemetry"]["events"] == hist["events"]
    assert out["telemetry_summary"]["final_energy"] == 1.25
    lazy = mgr.open_checkpoint(v1.CHECKPOINT_ID).state["chunked"]
    np.testing.assert_array_equal(lazy[2, 3:5, 10:12], v1.expected_state()["chunked"][2, 3:5, 10:12])


def test_golden_v1_files_are_the_committed_ones():
    """The golden files match the digests recorded when v1 was frozen: nobody regenerated them."""
    _check_digests(v1.STORE, "v1.sha256")


def test_golden_v2_files_are_the_committed_ones():
    """Likewise for v2 (compressed arrays)."""
    _check_digests(v2.STORE, "v2.sha256")


def test_golden_v3_files_are_the_committed_ones():
    """Likewise for v3 (packed leaves)."""
    _check_digests(v3.STORE, "v3.sha256")


def _check_digests(store: str, listing: str) -> None:
    import hashlib

    with open(os.path.join(os.path.dirname(store), listing)) as f:
        recorded = dict(reversed(line.split()) for line in f if line.strip())
    found = {}
    for base, _, files in os.walk(store):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as fh:
                found["./" + os.path.relpath(path, store)] = hashlib.sha256(fh.read()).hexdigest()
    assert found == recorded


def test_golden_v2_reads_bit_exactly(tmp_path):
    """Format v2: compressed arrays (zstd, blosc with zstd and lz4), an edge chunk, arrays the
    switch-off rule or the policy left uncompressed; read whole, lazily and verified."""
    import json

    store = tmp_path / "v2"
    shutil.copytree(v2.STORE, store)
    mgr = CheckpointManager(store)
    assert [i.checkpoint_id for i in mgr.list_checkpoints()] == [v2.CHECKPOINT_ID]
    assert mgr.verify_checkpoint(v2.CHECKPOINT_ID).ok
    out = mgr.load_checkpoint(v2.CHECKPOINT_ID)
    assert_tree_equal(v2.expected_state(), out["state"])
    assert out["iteration"] == 7 and out["flow_config"] == {"step_size": 0.1}
    assert list(out["telemetry"]["phase"]) == v2.expected_history()["phase"]
    path = mgr.checkpoint_path(v2.CHECKPOINT_ID)
    with open(os.path.join(path, "zarr.json")) as f:
        assert json.load(f)["attributes"]["format_version"] == 2
    for leaf, codec in v2.EXPECTED_CODECS.items():
        with open(os.path.join(path, "state", leaf, "zarr.json")) as f:
            names = [c["name"] for c in json.load(f)["codecs"]]
        assert names == (["bytes", "crc32c"] if codec is None else ["bytes", codec, "crc32c"]), leaf
    lazy = mgr.open_checkpoint(v2.CHECKPOINT_ID).state["zstd"]["sparse"]
    np.testing.assert_array_equal(lazy[1020:1030, 5:9], v2.expected_state()["zstd"]["sparse"][1020:1030, 5:9])


def test_golden_v3_reads_bit_exactly(tmp_path):
    """Format v3: packed leaves of many data types (several to a pack, 0-d numpy scalars, PRNG
    keys beside a plain uint32 leaf) and the leaves never packed (above the limit, compressed,
    empty); read whole, lazily (a packed leaf reads its pack's range) and verified."""
    import json

    store = tmp_path / "v3"
    shutil.copytree(v3.STORE, store)
    mgr = CheckpointManager(store)
    assert [i.checkpoint_id for i in mgr.list_checkpoints()] == [v3.CHECKPOINT_ID]
    assert mgr.verify_checkpoint(v3.CHECKPOINT_ID).ok
    out = mgr.load_checkpoint(v3.CHECKPOINT_ID)
    state = out["state"]
    for name, impl in v3.KEYS.items():
        key = state["rng"].pop(name)
        assert str(jax.random.key_impl(key)) == impl
        state["rng"][f"{name}_data"] = np.asarray(jax.random.key_data(key))
    assert_tree_equal(v3.expected_state(), state)
    assert out["iteration"] == 3 and out["flow_config"] == {"step_size": 0.1}
    assert list(out["telemetry"]["phase"]) == v3.expected_history()["phase"]
    assert out["telemetry"]["events"] == v3.expected_history()["events"]
    path = mgr.checkpoint_path(v3.CHECKPOINT_ID)
    with open(os.path.join(path, "zarr.json")) as f:
        attrs = json.load(f)["attributes"]
    assert attrs["format_version"] == 3

    def nodes(node):
        if node["kind"] == "array":
            yield node
        for child in node.get("children", []):
            yield from nodes(child)

    by_path = {n["path"]: n for n in nodes(attrs["pytree"])}
    assert {p: n["packed"]["array"] for p, n in by_path.items() if "packed" in n} == v3.EXPECTED_PACKED
    assert sorted(p for p, n in by_path.items() if "packed" not in n) == sorted(v3.EXPECTED_UNPACKED)
    for leaf, codec in v3.EXPECTED_UNPACKED.items():
        with open(os.path.join(path, "state", leaf, "zarr.json")) as f:
            names = [c["name"] for c in json.load(f)["codecs"]]
        assert names == (["bytes", "crc32c"] if codec is None else ["bytes", codec, "crc32c"]), leaf
    assert sorted(os.listdir(os.path.join(path, "packed"))) == sorted({*v3.EXPECTED_PACKED.values(), "zarr.json"})
    lazy = mgr.open_checkpoint(v3.CHECKPOINT_ID).state
    np.testing.assert_array_equal(lazy["layer"]["w"][1:, 2:4], v3.expected_state()["layer"]["w"][1:, 2:4])
    assert lazy["layer"]["b"][...].tobytes() == v3.expected_state()["layer"]["b"].tobytes()
    np.testing.assert_array_equal(lazy["big"][19990:], v3.expected_state()["big"][19990:])
