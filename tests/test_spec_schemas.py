"""The JSON Schemas in spec/schemas/ accept what we write and refuse what we must not."""

import collections
import json
import os

import jax
import jsonschema
import numpy as np
import pytest

SPEC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "spec", "schemas")


def schema(name):
    with open(os.path.join(SPEC, name)) as f:
        s = json.load(f)
    jsonschema.Draft202012Validator.check_schema(s)
    return jsonschema.Draft202012Validator(s)


def test_written_attrs_validate(mgr):
    NT = collections.namedtuple("NT", "a b")
    tree = {"x": np.ones((2, 3)), "k": jax.random.key(1), "l": [1, 2.5, None, "s", float("nan"), 1j], "n": NT(1, {})}
    hist = {"iter": [0, 1], "E": [1.0, float("nan")], "phase": ["RED", "GREEN"], "events": [{"type": "X", "iter": 1}]}
    cid = mgr.create_checkpoint("r", 3, tree, {"lr": 0.1}, telemetry_history=hist, certificates={"gamma": 0.5})
    rb = mgr.rollback_to_checkpoint(cid, "b")
    root_v, arr_v = schema("checkpoint-attrs.schema.json"), schema("array-attrs.schema.json")
    for c in (cid, rb):
        path = mgr.checkpoint_path(c)
        with open(os.path.join(path, "zarr.json")) as f:
            root_v.validate(json.load(f)["attributes"])
        n = 0
        for base, _, files in os.walk(path):
            if "zarr.json" in files and base != path:
                with open(os.path.join(base, "zarr.json")) as f:
                    doc = json.load(f)
                if doc["node_type"] == "array":
                    arr_v.validate(doc["attributes"])
                    n += 1
        assert n >= 8


@pytest.mark.parametrize(
    "mutate",
    [
        lambda a: a.pop("run_id"),
        lambda a: a.update(format_version="1"),
        lambda a: a.update(run_id="../x"),
        lambda a: a["pytree"].update(kind="pickle"),
    ],
)
def test_schema_refuses_bad_attrs(mgr, mutate):
    cid = mgr.create_checkpoint("r", 1, {"x": np.ones(2)}, {})
    with open(os.path.join(mgr.checkpoint_path(cid), "zarr.json")) as f:
        attrs = json.load(f)["attributes"]
    schema("checkpoint-attrs.schema.json").validate(attrs)
    mutate(attrs)
    with pytest.raises(jsonschema.ValidationError):
        schema("checkpoint-attrs.schema.json").validate(attrs)


def test_packed_nodes_validate_and_malformed_ones_are_refused(mgr):
    """Format v3 (spec/FORMAT.md 8.2): a packed leaf's ``packed`` member matches the schema
    (a PRNG key's with its implementation); malformed members are refused."""
    tree = {"x": np.ones((2, 3), np.float32), "k": jax.random.key(1), "big": np.zeros(20000, np.float32)}
    cid = mgr.create_checkpoint("r", 1, tree)
    with open(os.path.join(mgr.checkpoint_path(cid), "zarr.json")) as f:
        attrs = json.load(f)["attributes"]
    v = schema("checkpoint-attrs.schema.json")
    v.validate(attrs)
    x, k, big = attrs["pytree"]["children"]
    assert attrs["format_version"] == 3 and "packed" not in big
    assert x["packed"]["array"] == "float32" and k["packed"]["cfs_prng_key_impl"] == "threefry2x32"
    good = dict(x["packed"])
    for bad in [
        {m: val for m, val in good.items() if m != "crc32c"},
        {**good, "array": "../state"},
        {**good, "array": "Float32"},
        {**good, "offset": -1},
        {**good, "offset": 1.5},
        {**good, "shape": [2, -3]},
        {**good, "shape": [1] * 65},
        {**good, "crc32c": 1 << 32},
        {**good, "cfs_prng_key_impl": "philox"},
        "float32",
    ]:
        x["packed"] = bad
        assert not v.is_valid(attrs), bad
    x["packed"] = good
    assert v.is_valid(attrs) and not v.is_valid({**attrs, "format_version": 4})


def test_commit_records_validate(s3_url):
    """The commit record an object-store save writes (spec/FORMAT.md 3.2) matches its schema,
    and the schema refuses records a reader must refuse."""
    from computable_flows_shim import CheckpointManager

    mgr = CheckpointManager(s3_url)
    cid = mgr.create_checkpoint("r", 1, {"x": np.arange(5.0), "t": {"y": np.ones(3, np.float32)}})
    rb = mgr.rollback_to_checkpoint(cid, "b")
    v = schema("commit-record.schema.json")
    for c in (cid, rb):
        rec = json.loads(mgr.store._get(f".cfs-commits/{c}.json"))
        v.validate(rec)
        assert rec["data"] == f"{c}/{rec['token']}" and "packed/float64/c.0" in rec["objects"]
        assert all(len(meta) == 3 for meta in rec["objects"].values())  # size, CRC32C, SHA-256
        bad = [
            {**rec, "objects": {**rec["objects"], "../x": [1, 2]}},
            {**rec, "objects": {**rec["objects"], "packed/float64/c.0": [1, 1 << 33]}},
            {**rec, "token": "XYZ"},
            {**rec, "objects": {**rec["objects"], "packed/float64/c.0": [1, 2, "not-a-sha256"]}},
            {k: x for k, x in rec.items() if k != "objects"},
        ]
        for b in bad:
            assert not v.is_valid(b), b
