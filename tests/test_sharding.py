"""Sharded jax.Arrays: saved from 8 CPU devices, restored onto 1, 2 and 4 devices with other
shardings, each in a fresh process with its own device count; each device reads only the
chunks its shard touches."""

import os
import subprocess
import sys
import textwrap

import pytest

SAVE = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from computable_flows_shim import CheckpointManager
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
w = np.arange(64 * 4096, dtype=np.float32).reshape(64, 4096)
state = {"w": jax.device_put(w, NamedSharding(mesh, P("a", "b"))),
         "v": jax.device_put(np.arange(8 * 1024.0), NamedSharding(mesh, P(("a", "b")))),
         "s": jax.device_put(np.float32(3), NamedSharding(mesh, P()))}
assert len(state["w"].addressable_shards) == 8
print(CheckpointManager(sys.argv[1]).create_checkpoint("sharded", 1, state, {}))
"""

RESTORE = """
import os, sys
n = int(sys.argv[2])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from computable_flows_shim import CheckpointManager
assert len(jax.devices()) == n
mesh = Mesh(np.array(jax.devices()), ("d",))
target = {"w": jax.ShapeDtypeStruct((64, 4096), np.float32, sharding=NamedSharding(mesh, P(None, "d"))),
          "v": jax.ShapeDtypeStruct((8 * 1024,), np.float64, sharding=NamedSharding(mesh, P("d"))),
          "s": jax.ShapeDtypeStruct((), np.float32, sharding=NamedSharding(mesh, P()))}
out = CheckpointManager(sys.argv[1]).load_checkpoint(sys.argv[3], target=target)["state"]
assert out["w"].sharding == target["w"].sharding and len(out["w"].addressable_shards) == n
np.testing.assert_array_equal(np.asarray(out["w"]), np.arange(64 * 4096, dtype=np.float32).reshape(64, 4096))
np.testing.assert_array_equal(np.asarray(out["v"]), np.arange(8 * 1024.0))
assert float(out["s"]) == 3.0
print("OK", n)
"""


def run(code, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["JAX_ENABLE_X64"] = "1"
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    store = str(tmp_path_factory.mktemp("sharded") / "store")
    return store, run(SAVE, store)


@pytest.mark.parametrize("devices", [1, 2, 4])
def test_restore_on_other_device_counts_and_shardings(saved, devices):
    store, cid = saved
    assert run(RESTORE, store, str(devices), cid) == f"OK {devices}"


_OPENED: list[str] = []


def _audit(event, args):
    if event == "open" and isinstance(args[0], str) and "/state/w/c." in args[0]:
        _OPENED.append(os.path.basename(args[0]))


def test_each_device_reads_only_its_chunks(tmp_path):
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from computable_flows_shim import CheckpointManager

    sys.addaudithook(_audit)
    w = np.arange(4096 * 1024, dtype=np.float32).reshape(4096, 1024)  # 16 MiB: 4 chunks of 1024 rows
    mgr = CheckpointManager(tmp_path / "s")
    cid = mgr.create_checkpoint("r", 1, {"w": w}, {})
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(mesh, P("d")))}
    _OPENED.clear()
    out = mgr.load_checkpoint(cid, target=target)["state"]["w"]
    assert sorted(_OPENED) == ["c.0.0", "c.1.0", "c.2.0", "c.3.0"]  # one chunk per device, each read once
    for shard in out.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), w[shard.index])
