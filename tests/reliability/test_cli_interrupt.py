"""`cfs run` as a real process: killed (SIGKILL) or stopped (SIGTERM) mid-run, then
`cfs resume` gives exactly the uninterrupted run's final state and energy column."""

import os
import signal
import subprocess
import sys
import time

from computable_flows_shim import CheckpointManager

ITERS, EVERY = "1500", "100"
FINAL = "r-i000000001500"


def cfs(*args, **kw):
    return [sys.executable, "-m", "computable_flows_shim", *args]


def run_to_end(store):
    r = subprocess.run(
        cfs(
            "--store",
            store,
            "run",
            "deconv1d",
            "--run-id",
            "r",
            "--iters",
            ITERS,
            "--checkpoint-every",
            EVERY,
            "--quiet",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return CheckpointManager(store).load_checkpoint(FINAL)


def start_and_wait_for_first_checkpoint(store):
    p = subprocess.Popen(
        cfs(
            "--store",
            store,
            "run",
            "deconv1d",
            "--run-id",
            "r",
            "--iters",
            ITERS,
            "--checkpoint-every",
            EVERY,
            "--quiet",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(store, "r-i000000000100")):
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    return p


def assert_same(a, b):
    assert a["state"]["x"].tobytes() == b["state"]["x"].tobytes()
    assert a["telemetry"]["E"].tobytes() == b["telemetry"]["E"].tobytes()
    assert list(a["telemetry"]["iter"]) == list(b["telemetry"]["iter"])


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    reference = run_to_end(str(tmp_path / "ref"))
    store = str(tmp_path / "killed")
    p = start_and_wait_for_first_checkpoint(store)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    done = {i.iteration for i in CheckpointManager(store).list_checkpoints("r")}
    assert 1500 not in done and 100 in done
    r = subprocess.run(cfs("--store", store, "resume", "r", "--quiet"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same(CheckpointManager(store).load_checkpoint(FINAL), reference)


def test_sigterm_checkpoints_exits_cleanly_and_resumes(tmp_path):
    reference = run_to_end(str(tmp_path / "ref"))
    store = str(tmp_path / "term")
    p = start_and_wait_for_first_checkpoint(store)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "resume with:" in err
    mgr = CheckpointManager(store)
    last = mgr.get_latest_checkpoint("r")
    assert last in err and last != FINAL
    events = [e["type"] for e in mgr.load_checkpoint(last)["telemetry"]["events"]]
    assert events[-2:] == ["RUN_INTERRUPTED", "CHECKPOINT_CREATED"], events
    r = subprocess.run(cfs("--store", store, "resume", last, "--quiet"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same(mgr.load_checkpoint(FINAL), reference)
