"""Property tests: random pytrees x every dtype x shapes (0-d and empty) round-trip bit-exactly."""

import itertools
import tempfile

from hypothesis import HealthCheck, given, settings
from strategies import arrays, assert_lazy_slices_match, assert_tree_equal, pytrees

from computable_flows_shim import CheckpointManager

_counter = itertools.count()
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(tree=pytrees)
def test_pytree_roundtrip_is_bit_exact(tree):
    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d, durable=False)
        cid = mgr.create_checkpoint("prop", next(_counter), tree, {})
        assert_tree_equal(tree, mgr.load_checkpoint(cid)["state"])


@SETTINGS
@given(a=arrays(max_side=40))
def test_lazy_slices_equal_numpy_slices(a):
    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d, durable=False)
        cid = mgr.create_checkpoint("lazy", 0, {"a": a}, {})
        lazy = mgr.open_checkpoint(cid).state["a"]
        assert_lazy_slices_match(lazy, a)
