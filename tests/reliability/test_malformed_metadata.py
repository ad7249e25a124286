"""Scenario 7b (issue 5): >= 10,000 Hypothesis-generated malformed metadata documents.

Each case starts from metadata this library writes (an array's zarr.json, a root with its
pytree and checksums, event payloads, raw bytes) and breaks it: a value anywhere replaced
by another JSON value (huge and negative integers, NaN, paths such as ``../x``, names
such as ``object`` or ``gzip``, nested lists and objects), a member deleted or added, or
the bytes cut and flipped.  The documents go, in memory, to the parsers a load runs
(``loads_metadata``, ``parse_array``, ``parse_root``, the pytree walk and rebuild with
``scalar_value`` and the path check, the events decoder).  Target: each accepts the
document or raises one of the library's errors; nothing else escapes.
"""

from __future__ import annotations

import copy
import json
import os

import crc32c
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from computable_flows_shim import ComputableFlowsError
from computable_flows_shim._format import root as _root
from computable_flows_shim._format import stored as _stored
from computable_flows_shim._format import telemetry as _telemetry
from computable_flows_shim._format.arrays import Layout, array_metadata, loads_metadata, parse_array
from computable_flows_shim._format.tree import flatten, iter_leaf_nodes, scalar_value, unflatten

from .conftest import add

EXAMPLES = int(os.environ.get("CFS_MALFORMED_EXAMPLES", "2600"))  # x 4 tests
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
NAMES = [
    "",
    ".",
    "..",
    "/",
    "../x",
    "/etc/passwd",
    "a\x00b",
    "x/../../y",
    "object",
    "|O",
    "pickle",
    "gzip",
    "zstd",
    "string",
    "float64",
    "bool",
    "bfloat16",
    "regular",
    "default",
    "bytes",
    "crc32c",
    "vlen-utf8",
    "little",
    "big",
    "threefry2x32",
    "rbg",
    "array",
    "dict",
    "list",
    "tuple",
    "scalar",
    "none",
    "custom",
    "namedtuple",
    "int",
    "float",
    "complex",
    "str",
    "NaN",
    "Infinity",
    "-Infinity",
    "c.0",
    "zarr.json",
    "state/x/zarr.json",
]
KEYS = [
    "kind",
    "path",
    "children",
    "keys",
    "name",
    "type",
    "value",
    "numpy_scalar",
    "shape",
    "data_type",
    "chunk_grid",
    "configuration",
    "chunk_shape",
    "chunk_key_encoding",
    "separator",
    "codecs",
    "endian",
    "attributes",
    "cfs_chunk_crc32c",
    "cfs_prng_key_impl",
    "zarr_format",
    "node_type",
    "format",
    "format_version",
    "pytree",
    "checkpoint_id",
    "run_id",
    "iteration",
    "cfs_metadata_crc32c",
    "cfs_root_crc32c",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 3, 2**31, 2**32, 2**40, 2**50, 2**63, 2**64, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(NAMES),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=5)
    ),
    max_leaves=8,
)
COUNTS: dict[str, int] = {}


@st.composite
def mutated(draw, doc):
    """``doc`` with 1-3 random edits: replace a node, delete a member, add one."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        node, parent, key = doc, None, None
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)):
            parent, key = node, draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            node = node[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if parent is None:
            if action == "add" and isinstance(doc, dict):
                doc[draw(st.sampled_from(KEYS))] = draw(JSON)
            elif action != "add":
                doc = draw(JSON)
        elif action == "replace":
            parent[key] = draw(JSON)
        elif action == "delete":
            del parent[key]
        elif isinstance(node, dict):
            node[draw(st.sampled_from(KEYS))] = draw(JSON)
        elif isinstance(node, list):
            node.append(draw(JSON))
    return doc


def only_library_errors(fn, *args) -> None:
    try:
        fn(*args)
    except ComputableFlowsError:
        pass


def _array_docs() -> list[dict]:
    docs = []
    for shape, dtype in [((4, 5), np.float32), ((), np.int64), ((0, 3), np.uint8), ((70,), None)]:
        layout = Layout(shape, None if dtype is None else np.dtype(dtype), tuple(max(1, n) for n in shape) or ())
        docs.append(
            array_metadata(layout, [f"x.d{i}" for i in range(len(shape))], {"cfs_chunk_crc32c": [7] * layout.nchunks})
        )
    docs[0]["attributes"]["cfs_prng_key_impl"] = "threefry2x32"
    return docs


def _root_attrs() -> dict:
    import collections

    nt = collections.namedtuple("NT", "a b")
    tree, _ = flatten({"x": np.ones(3), "l": [1, 2.5, None, "s", 1j, True], "n": nt(np.ones(2), {}), 7: (np.int8(1),)})
    return {
        "format": "computable-flows-shim.checkpoint",
        "format_version": 1,
        "checkpoint_id": "r-i000000000001",
        "run_id": "r",
        "iteration": 1,
        "flow_config": {"a": [1, {"b": None}]},
        "pytree": tree,
        "cfs_metadata_crc32c": {"state/zarr.json": 1, "state/x/zarr.json": 2, "telemetry/zarr.json": 3},
    }


ARRAY_DOCS = _array_docs()
ROOT = {"zarr_format": 3, "node_type": "group", "attributes": _root_attrs()}


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    os.makedirs(d / "state")
    return str(d)


def sign(attrs: dict) -> bytes:
    """``_root.root_bytes`` as a hostile writer would run it: NaN literals allowed."""
    attrs = {k: v for k, v in attrs.items() if k != "cfs_root_crc32c"}
    body = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}, separators=(",", ":")).encode()
    head = body[:-2] + (b"," if attrs else b"")
    return head + b'"cfs_root_crc32c":"%08x"}}' % crc32c.crc32c(head)


def check_root(doc: dict, raw: bytes, state_dir: str) -> None:
    attrs, _ = _root.parse_root(doc, raw, "where")

    def leaf(kp, node):
        if node["kind"] == "scalar":
            return scalar_value(node, "where")
        return _stored.safe_join(os.path.join(state_dir, "state"), node["path"], "where")

    list(iter_leaf_nodes(attrs["pytree"]))
    unflatten(attrs["pytree"], leaf)


@SETTINGS
@given(st.data())
def test_malformed_array_metadata(data):
    doc = data.draw(mutated(data.draw(st.sampled_from(ARRAY_DOCS))))
    if isinstance(doc, dict):
        only_library_errors(parse_array, doc, "where")
    only_library_errors(loads_metadata, json.dumps(doc).encode(), "where")
    COUNTS["array metadata (parse_array)"] = COUNTS.get("array metadata (parse_array)", 0) + 1


@SETTINGS
@given(st.data())
def test_malformed_root_and_pytree(state_dir, data):
    doc = data.draw(mutated(ROOT))
    COUNTS["root attributes and pytree (parse_root, walk, rebuild)"] = (
        COUNTS.get("root attributes and pytree (parse_root, walk, rebuild)", 0) + 1
    )
    if not isinstance(doc, dict):
        only_library_errors(loads_metadata, json.dumps(doc).encode(), "where")
        return
    signed = data.draw(st.booleans())  # with a valid root checksum (a hostile writer) or as written by hand
    attrs = doc.get("attributes")
    if signed and isinstance(attrs, dict):
        raw = sign(attrs)
        doc = json.loads(raw)
    else:
        raw = json.dumps(doc).encode()
    only_library_errors(check_root, doc, raw, state_dir)


@SETTINGS
@given(st.data())
def test_damaged_metadata_bytes(state_dir, data):
    raw = bytearray(_root.root_bytes(ROOT["attributes"], None))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[i : i + data.draw(st.integers(1, 40))]
        else:
            raw[i:i] = data.draw(st.binary(max_size=8))
        if not raw:
            raw = bytearray(b"{")

    def parse(b: bytes) -> None:
        check_root(loads_metadata(b, "where"), b, state_dir)

    only_library_errors(parse, bytes(raw))
    COUNTS["damaged metadata bytes (flip, cut, insert)"] = (
        COUNTS.get("damaged metadata bytes (flip, cut, insert)", 0) + 1
    )


@SETTINGS
@given(st.lists(st.one_of(st.text(max_size=30), SCALARS.map(json.dumps), JSON.map(json.dumps)), min_size=1, max_size=3))
def test_malformed_event_payloads(payloads):
    cols = {
        "event_iter": np.arange(len(payloads), dtype=np.int64),
        "event_type": np.array(["X"] * len(payloads), dtype=object),
        "event_payload": np.array(payloads, dtype=object),
    }
    try:
        _telemetry.events_from_columns(cols)
    except (ValueError, TypeError, RecursionError):
        pass  # read_telemetry turns exactly these into CheckpointCorruptError
    COUNTS["event payloads (events_from_columns)"] = COUNTS.get("event payloads (events_from_columns)", 0) + 1


def test_zz_malformed_metadata_figures(figures):
    """Records the counts of the tests above (runs after them: pytest keeps file order)."""
    if not COUNTS:
        pytest.skip("the Hypothesis tests did not run")
    fig = figures["7b. malformed metadata (Hypothesis, in memory)"]
    for k, v in COUNTS.items():
        add(fig, k, v)
    add(fig, "cases", sum(COUNTS.values()))
    fig["exceptions other than the library's"] = 0
