"""The cfs command line, in-process through its main()."""

import json
import os

import numpy as np

from computable_flows_shim import CheckpointManager
from computable_flows_shim._cli import main


def test_demo_list_show_verify_cleanup(tmp_path, capsys):
    root = str(tmp_path / "ck")
    assert main(["--root", root, "demo", "--run", "d", "--iterations", "300", "--interval", "100"]) == 0
    out = capsys.readouterr().out
    assert "saved d-i000000000300" in out and "rolled back: d-branch-i000000000200" in out
    assert main(["--root", root, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["checkpoint_id"] for r in listed][0] == "d-branch-i000000000200"
    assert {r["run_id"] for r in listed} == {"d", "d-branch"}
    assert main(["--root", root, "show", "d-i000000000100", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {leaf["leaf"] for leaf in shown["leaves"]} >= {"state['x']", "state['A']"}
    assert main(["--root", root, "verify"]) == 0
    assert capsys.readouterr().out.count(": OK") == 4
    assert main(["--root", root, "cleanup", "d", "--keep-last", "1"]) == 0
    assert "deleted 2" in capsys.readouterr().out


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
