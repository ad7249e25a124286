"""``cfs gc``, ``cfs du``, ``cfs tag``/``tags`` and quiet progress, in-process through main()."""

import json

import numpy as np
import pytest

from computable_flows_shim import CheckpointManager
from computable_flows_shim.cli._main import main


@pytest.fixture
def root(tmp_path):
    root = str(tmp_path / "ck")
    mgr = CheckpointManager(root, durable=False)
    for it in range(0, 100, 10):
        mgr.create_checkpoint(
            "a", it, {"x": np.full(1000, it, np.float64)}, telemetry_history={"iter": [it], "E": [float(it - 40) ** 2]}
        )
    mgr.rollback_to_checkpoint("a-i000000000020", "b")
    return root


def _ids(root, run):
    return sorted(i.checkpoint_id for i in CheckpointManager(root).list_checkpoints(run))


def test_gc_dry_run_table_then_the_same_for_real(root, capsys):
    assert main(["--store", root, "tag", "a-i000000000070", "paper-figure-3"]) == 0
    assert "a-i000000000070: paper-figure-3" in capsys.readouterr().out
    args = ["--store", root, "gc", "a", "--keep-last", "2", "--keep-best", "E:min:1", "--keep-every", "50"]
    before = _ids(root, "a")
    assert main([*args, "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert cap.err == ""  # no progress bar when stderr is not a terminal
    lines = {line.split()[0]: line for line in cap.out.splitlines() if line.startswith("a-i")}
    assert "newest" in lines["a-i000000000090"] and "keep_latest(2)" in lines["a-i000000000090"]
    assert "keep_best(E, min, 1): #1 E=0" in lines["a-i000000000040"]
    assert "tagged: paper-figure-3" in lines["a-i000000000070"]
    assert "lineage: branch run b" in lines["a-i000000000020"]
    assert "keep_every(50)" in lines["a-i000000000000"] and "keep_every(50)" in lines["a-i000000000050"]
    assert " delete " in lines["a-i000000000010"] and " delete " in lines["a-i000000000030"]
    assert "would delete 3 of 10 checkpoint(s), freeing" in cap.out
    assert _ids(root, "a") == before

    assert main([*args, "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert main([*args, "--json"]) == 0
    real = json.loads(capsys.readouterr().out)
    assert dry["dry_run"] and not real["dry_run"]
    assert dry["decisions"] == real["decisions"] and dry["freed_bytes"] == real["freed_bytes"] > 0
    assert _ids(root, "a") == sorted(d["checkpoint_id"] for d in dry["decisions"] if d["action"] == "keep")

    assert main(["--store", root, "gc", "a", "--keep-last", "1", "--force"]) == 0
    out = capsys.readouterr().out
    assert "deleted 5 of 7 checkpoint(s), freed" in out  # 20 (branched from) too; 70 stays tagged
    assert _ids(root, "a") == ["a-i000000000070", "a-i000000000090"]


def test_gc_needs_a_policy_and_valid_options(root, capsys):
    assert main(["--store", root, "gc", "a"]) == 2
    assert "--keep-" in capsys.readouterr().err
    for bad in (
        ["--keep-last", "0"],
        ["--keep-best", "E:median"],
        ["--keep-best", "E:min:x"],
        ["--keep-interval", "-1"],
    ):
        with pytest.raises(SystemExit):
            main(["--store", root, "gc", "a", *bad])
        assert "error" in capsys.readouterr().err


def test_du_counts_links_once_and_predicts_gc(root, capsys):
    assert main(["--store", root, "du", "--json"]) == 0
    du = json.loads(capsys.readouterr().out)
    runs = {r["run_id"]: r for r in du["runs"]}
    assert runs["a"]["checkpoints"] == 10 and runs["b"]["checkpoints"] == 1
    assert runs["b"]["shared_bytes"] > 8000 and runs["b"]["exclusive_bytes"] < 2000  # arrays linked from a
    assert du["total_bytes"] < runs["a"]["bytes"] + runs["b"]["bytes"]
    assert main(["--store", root, "du", "a", "--keep-last", "3", "--json"]) == 0
    du_a = json.loads(capsys.readouterr().out)
    assert len(du_a["checkpoints"]) == 10
    assert sorted(du_a["gc"]["would_delete"]) == [f"a-i{i:012d}" for i in (0, 10, 30, 40, 50, 60)]
    assert main(["--store", root, "du", "a", "--keep-last", "3"]) == 0
    out = capsys.readouterr().out
    assert "a-i000000000020" in out and "gc with keep_latest(3) would delete 6 checkpoint(s)" in out
    assert main(["--store", root, "du", "--keep-last", "3"]) == 2
    assert "need a RUN" in capsys.readouterr().err


def test_tag_commands(root, capsys):
    assert main(["--store", root, "tag", "a-i000000000010", "best", "x"]) == 0
    assert main(["--store", root, "tag", "a-i000000000010", "x", "--remove"]) == 0
    capsys.readouterr()
    assert main(["--store", root, "tags", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"a-i000000000010": ["best"]}
    assert main(["--store", root, "tags", "--tag", "nope"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["--store", root, "tag", "a-i000000000010", "../x"]) == 2
    assert "invalid tag" in capsys.readouterr().err


def test_rm_and_verify_stay_quiet_off_a_terminal(root, capsys):
    assert main(["--store", root, "verify"]) == 0
    cap = capsys.readouterr()
    assert cap.out.count(": OK") == 11 and cap.err == ""
    assert main(["--store", root, "rm", "a-i000000000010", "a-i000000000030"]) == 0
    assert capsys.readouterr().err == ""
