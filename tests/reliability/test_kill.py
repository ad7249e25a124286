"""SIGKILL a real writer process at random moments; every listed checkpoint must then
load bit-exactly, nothing partial may be visible, and stale temporaries get cleaned."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from computable_flows_shim import CheckpointManager

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from _writer import history, make_state  # noqa: E402

KILLS = int(os.environ.get("CFS_KILLS", "50"))


def check_store(store: str, committed: set[int], checked: set[str] | None = None) -> None:
    """Every listed checkpoint not in ``checked`` loads bit-exactly and verifies."""
    mgr = CheckpointManager(store)  # runs stale cleanup, like any new manager
    infos = mgr.list_checkpoints()
    listed = {i.iteration for i in infos}
    assert committed <= listed, f"lost committed checkpoints: {sorted(committed - listed)}"
    checked = set() if checked is None else checked
    for info in infos:
        if info.checkpoint_id in checked:
            continue
        checked.add(info.checkpoint_id)
        out = mgr.load_checkpoint(info.checkpoint_id)
        want = make_state(info.iteration)
        for k in ("x", "big"):
            assert out["state"][k].tobytes() == want[k].tobytes(), (info.checkpoint_id, k)
        assert out["state"]["opt"]["mu"].tobytes() == want["opt"]["mu"].tobytes()
        assert [a.tobytes() for a in out["state"]["leaves"]] == [a.tobytes() for a in want["leaves"]]
        np.testing.assert_array_equal(out["telemetry"]["E"], history(info.iteration)["E"])
        assert mgr.verify_checkpoint(info.checkpoint_id).ok
    assert os.listdir(os.path.join(store, ".cfs-staging")) == []


def test_sigkill_at_random_moments(tmp_path):
    store = str(tmp_path / "store")
    rng = random.Random(1234)
    committed: set[int] = set()
    checked: set[str] = set()
    start = 0
    mid_save_kills = 0
    for _ in range(KILLS):
        p = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_writer.py"), store, "kill", str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate()
        p.stdout.close()
        saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
        committed.update(saved)
        staging = os.path.join(store, ".cfs-staging")
        if os.path.isdir(staging) and os.listdir(staging):
            mid_save_kills += 1
        # the next writer continues after whatever is on disk (a kill after the rename
        # but before "saved" was printed leaves a committed checkpoint we did not hear of)
        on_disk = [int(n.rsplit("-i", 1)[1]) for n in os.listdir(store) if n.startswith("kill-i")]
        start = max(on_disk + [start - 1]) + 1
        check_store(store, committed, checked)
    check_store(store, committed)  # finally: everything again, old checkpoints included
    assert mid_save_kills >= KILLS // 4, f"only {mid_save_kills} kills landed during a save"
    assert len(committed) > 0


@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01, 0.03])
def test_kill_leaves_previous_checkpoint_loadable(tmp_path, delay):
    store = str(tmp_path / "store")
    CheckpointManager(store).create_checkpoint("kill", 0, make_state(0), {}, telemetry_history=history(0))
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "_writer.py"), store, "kill", "1"], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "ready"
    time.sleep(delay)
    p.kill()
    p.communicate()
    p.stdout.close()
    check_store(store, {0})
