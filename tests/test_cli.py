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
    mgr = CheckpointManager(root, pack_max_bytes=0)
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


def test_the_store_option_goes_before_or_after_the_command(tmp_path, capsys):
    root, other = str(tmp_path / "a"), str(tmp_path / "b")
    CheckpointManager(root).create_checkpoint("r", 1, {"x": np.arange(3.0)})
    CheckpointManager(other).create_checkpoint("o", 1, {"x": np.arange(3.0)})
    assert main(["ls", "--store", root]) == 0
    assert "r-i000000000001" in capsys.readouterr().out
    assert main(["--store", other, "ls", "--store", root, "--json"]) == 0  # the command's own wins
    assert [c["checkpoint_id"] for c in json.loads(capsys.readouterr().out)] == ["r-i000000000001"]
    assert main(["show", "r-i000000000001", "--root", root]) == 0


def test_reading_commands_never_create_a_store(tmp_path, capsys):
    typo = str(tmp_path / "typo")
    for argv in (
        ["ls"],
        ["show", "r-i000000000001"],
        ["verify"],
        ["du"],
        ["tree"],
        ["tags"],
        ["diff", "r-i000000000001", "r-i000000000002"],
        ["rm", "r-i000000000001"],
        ["resume", "r"],
        ["gc", "r", "--keep-last", "1"],
    ):
        assert main(["--store", typo, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"no checkpoint store at {typo}" in err, (argv, err)
        assert not os.path.exists(typo), argv


def test_a_closed_pipe_ends_quietly(tmp_path):
    """``cfs ls --json | head -1`` with more output than the pipe holds: no traceback, exit 141."""
    import subprocess
    import sys

    root = str(tmp_path / "s")
    mgr = CheckpointManager(root)
    for it in range(300):
        mgr.create_checkpoint(f"run-with-a-long-name-{it % 4}", it, {"x": np.zeros(1)})
    p = subprocess.Popen(
        [sys.executable, "-m", "computable_flows_shim", "--store", root, "ls", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.readline()
    p.stdout.close()  # what head does after its first line
    err = p.stderr.read().decode()
    p.stderr.close()
    assert p.wait(timeout=120) == 141, err
    assert first.startswith(b"[") and err == "", err
