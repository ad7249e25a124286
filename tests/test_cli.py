"""The cfs command line, in-process through its main()."""

import json
import os

import numpy as np

from computable_flows_shim import CheckpointManager
from computable_flows_shim.cli._main import main


def test_run_ls_show_resume_rollback_verify_rm(tmp_path, capsys):
    root = str(tmp_path / "ck")
    assert main(["--store", root, "run", "deconv1d", "--run-id", "d", "--iters", "300", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "run d: 300 iterations" in out and "last checkpoint d-i000000000300" in out
    assert main(["--store", root, "resume", "d", "--iters", "400", "--quiet"]) == 0
    assert "run d: 400 iterations" in capsys.readouterr().out
    assert main(["--store", root, "rollback", "d-i000000000200", "--to-run", "d-branch"]) == 0
    assert capsys.readouterr().out.strip() == "d-branch-i000000000200"
    assert main(["--store", root, "ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["checkpoint_id"] == "d-branch-i000000000200"
    assert {r["run_id"] for r in listed} == {"d", "d-branch"} and len(listed) == 5
    assert main(["--store", root, "show", "d-i000000000100", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {leaf["leaf"] for leaf in shown["leaves"]} == {"state['x']", "state['y']", "state['key']", "state['alpha']"}
    assert shown["certificates"]["phase"] == "GREEN"
    assert main(["--store", root, "verify"]) == 0
    assert capsys.readouterr().out.count(": OK") == 5
    assert main(["--store", root, "rm", "d-i000000000100", "nope-i000000000001"]) == 1
    assert len(CheckpointManager(root).list_checkpoints("d")) == 3


def test_verify_reports_damage_and_fails(tmp_path, capsys):
    root = str(tmp_path / "ck")
    mgr = CheckpointManager(root)
    cid = mgr.create_checkpoint("r", 1, {"a": np.arange(100.0)}, {})
    chunk = os.path.join(mgr.checkpoint_path(cid), "state", "a", "c.0")
    with open(chunk, "r+b") as f:
        f.write(b"\xff")
    assert main(["--root", root, "verify", cid]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "state['a']" in out and "checksum mismatch" in out


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["--root", str(tmp_path), "show", "nope-i000000000001"]) == 2
    assert "no checkpoint 'nope-i000000000001'" in capsys.readouterr().err
