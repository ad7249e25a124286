"""Tags: stored beside the immutable checkpoints, validated like run ids, never deleted by
retention, removed with their checkpoint."""

import os

import numpy as np
import pytest

from computable_flows_shim import (
    CheckpointManager,
    CheckpointNotFoundError,
    InvalidTagError,
    KeepLatest,
)


@pytest.fixture
def mgr(tmp_path):
    m = CheckpointManager(tmp_path / "store", durable=False)
    for it in range(1, 6):
        m.create_checkpoint("r", it, {"x": np.arange(3.0) + it})
    return m


def test_tag_untag_list(mgr):
    assert mgr.tag_checkpoint("r-i000000000002", "best") is True
    assert mgr.tag_checkpoint("r-i000000000002", "best") is False  # already there
    assert mgr.tag_checkpoint("r-i000000000002", "paper-figure-3")
    assert mgr.tag_checkpoint("r-i000000000004", "last-good")
    assert mgr.tags("r-i000000000002") == ["best", "paper-figure-3"]
    assert mgr.tags("r-i000000000001") == []
    assert mgr.tagged() == {"r-i000000000002": ["best", "paper-figure-3"], "r-i000000000004": ["last-good"]}
    assert mgr.tagged("best") == {"r-i000000000002": ["best", "paper-figure-3"]}
    assert mgr.tagged(run_id="other") == {}
    assert mgr.untag_checkpoint("r-i000000000002", "best") is True
    assert mgr.untag_checkpoint("r-i000000000002", "best") is False
    assert mgr.tagged("best") == {}
    # another manager on the same store sees the same tags
    assert CheckpointManager(mgr.store.root).tags("r-i000000000002") == ["paper-figure-3"]


def test_checkpoints_stay_immutable_and_listing_ignores_tags(mgr):
    mgr.tag_checkpoint("r-i000000000003", "best")
    assert os.path.isfile(os.path.join(mgr.store.root, ".cfs-tags", "r-i000000000003", "best"))
    assert mgr.verify_checkpoint("r-i000000000003").ok  # nothing was written into the checkpoint
    assert len(mgr.list_checkpoints()) == 5  # no warning about .cfs-tags (filterwarnings=error)


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", ".hidden", "sp ace", "x" * 129, "tab\t", 3, None])
def test_bad_tags_are_refused(mgr, bad):
    with pytest.raises(InvalidTagError):
        mgr.tag_checkpoint("r-i000000000001", bad)
    with pytest.raises(InvalidTagError):
        mgr.untag_checkpoint("r-i000000000001", bad)
    assert not os.path.exists(os.path.join(mgr.store.root, ".cfs-tags", "r-i000000000001"))


def test_tagging_a_missing_checkpoint_fails(mgr):
    with pytest.raises(CheckpointNotFoundError):
        mgr.tag_checkpoint("r-i000000000099", "best")
    with pytest.raises(CheckpointNotFoundError):
        mgr.tag_checkpoint("../../etc", "best")
    with pytest.raises(CheckpointNotFoundError):
        mgr.tags("r-i000000000099")


def test_tagged_checkpoints_survive_retention_and_leave_with_delete(mgr):
    mgr.tag_checkpoint("r-i000000000001", "best")
    report = mgr.apply_retention("r", KeepLatest(1))
    assert report.kept == ["r-i000000000005", "r-i000000000001"]
    assert dict((d.checkpoint_id, d.reasons) for d in report.decisions)["r-i000000000001"] == ("tagged: best",)
    assert mgr.delete_checkpoint("r-i000000000001")  # an explicit delete is allowed, and takes the tags
    assert not os.path.exists(os.path.join(mgr.store.root, ".cfs-tags", "r-i000000000001"))
    assert not os.listdir(os.path.join(mgr.store.root, ".cfs-trash"))
    mgr.create_checkpoint("r", 1, {"x": np.zeros(1)})  # the same id again starts untagged
    assert mgr.tags("r-i000000000001") == []


def test_tags_of_a_vanished_checkpoint_are_ignored(mgr):
    """A crash between the two steps of a delete may leave tags behind; nobody sees them."""
    mgr.tag_checkpoint("r-i000000000002", "best")
    mgr.store.delete("r-i000000000002")  # the store alone: tags left behind
    assert mgr.tagged() == {}
    mgr.create_checkpoint("r", 2, {"x": np.zeros(1)})
    assert mgr.delete_checkpoint("r-i000000000002")
    assert not os.path.exists(os.path.join(mgr.store.root, ".cfs-tags", "r-i000000000002"))
