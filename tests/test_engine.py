"""run_flow / resume_flow: checkpoints, bit-identical resume, telemetry continuity, divergence."""

import numpy as np
import pytest

from computable_flows_shim import (
    CheckpointExistsError,
    CheckpointManager,
    FlowDivergedError,
    FlowSpecError,
    build_flow,
    compute_certificates,
    make_example,
    resume_flow,
    run_flow,
)


@pytest.fixture(scope="module")
def example():
    return make_example("deconv1d")


def test_run_checkpoints_every_interval_and_at_the_end(tmp_path, example):
    spec, y, _ = example
    mgr = CheckpointManager(tmp_path / "s")
    r = run_flow(spec, y, iters=250, checkpoint_manager=mgr, checkpoint_interval=100, run_id="r")
    assert r.status == "finished" and r.iteration == 250
    assert r.checkpoints == ["r-i000000000100", "r-i000000000200", "r-i000000000250"]
    assert sorted(i.checkpoint_id for i in mgr.list_checkpoints("r")) == r.checkpoints
    events = [e["type"] for e in r.telemetry["events"]]
    assert events[0] == "RUN_STARTED" and events.count("CHECKPOINT_CREATED") == 3 and "RUN_FINISHED" in events
    ck = mgr.load_checkpoint("r-i000000000250")
    assert ck["certificates"]["phase"] == "GREEN" and ck["flow_config"] == spec
    np.testing.assert_array_equal(ck["telemetry"]["E"], r.telemetry["E"])
    assert list(ck["telemetry"]["iter"]) == list(range(1, 251))
    np.testing.assert_array_equal(ck["state"]["x"], r.state["x"])


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, example):
    spec, y, _ = example
    full = run_flow(spec, y, iters=300, checkpoint_manager=CheckpointManager(tmp_path / "a"), run_id="r")
    mgr = CheckpointManager(tmp_path / "b")
    part = run_flow(spec, y, iters=300, checkpoint_manager=mgr, run_id="r", checkpoint_interval=100)
    for cid in ("r-i000000000200", "r-i000000000300"):
        mgr.delete_checkpoint(cid)
    resumed = resume_flow("r-i000000000100", mgr)
    assert resumed.iteration == 300 and resumed.status == "finished"
    assert resumed.state["x"].tobytes() == full.state["x"].tobytes()
    assert resumed.telemetry["E"].tobytes() == full.telemetry["E"].tobytes()
    assert list(resumed.telemetry["iter"]) == list(range(1, 301))  # no gap, no duplicate
    assert [e["type"] for e in resumed.telemetry["events"]].count("FLOW_RESUMED") == 1
    a, b = CheckpointManager(tmp_path / "a").load_checkpoint("r-i000000000300"), mgr.load_checkpoint("r-i000000000300")
    assert a["state"]["x"].tobytes() == b["state"]["x"].tobytes()
    import jax

    assert np.array_equal(jax.random.key_data(a["state"]["key"]), jax.random.key_data(b["state"]["key"]))
    del part


def test_resume_with_more_iterations_and_refusal_to_overwrite(tmp_path, example):
    spec, y, _ = example
    mgr = CheckpointManager(tmp_path / "s")
    run_flow(spec, y, iters=200, checkpoint_manager=mgr, run_id="r")
    with pytest.raises(CheckpointExistsError, match="rollback"):
        resume_flow("r-i000000000100", mgr)
    more = resume_flow("r-i000000000200", mgr, remaining_iters=150)
    assert more.iteration == 350 and more.checkpoints[-1] == "r-i000000000350"
    branch = mgr.rollback_to_checkpoint("r-i000000000100", "branch")
    b = resume_flow(branch, mgr, remaining_iters=100)
    assert b.run_id == "branch" and "ROLLBACK" in [e["type"] for e in b.telemetry["events"]]


def test_noise_uses_and_restores_the_prng_key(tmp_path, example):
    spec, y, _ = example
    noisy = {**spec, "noise": 0.05}
    full = run_flow(noisy, y, iters=200, seed=3)
    mgr = CheckpointManager(tmp_path / "s")
    run_flow(noisy, y, iters=200, seed=3, checkpoint_manager=mgr, run_id="n")
    mgr.delete_checkpoint("n-i000000000200")
    assert resume_flow("n-i000000000100", mgr).state["x"].tobytes() == full.state["x"].tobytes()
    other = run_flow(noisy, y, iters=200, seed=4)
    assert other.state["x"].tobytes() != full.state["x"].tobytes()


def test_divergence_stops_without_checkpointing_the_bad_state(tmp_path):
    spec = {
        "shape": [64],
        "dtype": "float32",
        "step": 50.0,
        "smooth": [{"kind": "quadratic", "operator": {"kind": "identity"}}],
    }
    mgr = CheckpointManager(tmp_path / "s")
    with pytest.raises(FlowDivergedError, match="diverged at iteration") as e:
        run_flow(spec, np.ones(64, np.float32), iters=500, checkpoint_manager=mgr, checkpoint_interval=5, run_id="d")
    assert e.value.last_good_checkpoint is not None
    good = mgr.load_checkpoint(e.value.last_good_checkpoint)
    assert np.all(np.isfinite(good["state"]["x"]))
    assert all(np.isfinite(i.telemetry_summary["final_energy"]) for i in mgr.list_checkpoints("d"))


def test_telemetry_sampling_every_k(example):
    spec, y, _ = example
    r = run_flow(spec, y, iters=100, telemetry_every=10)
    assert list(r.telemetry["iter"]) == list(range(10, 101, 10))


@pytest.mark.parametrize(
    "bad",
    [
        {"shape": [0]},
        {"shape": [8], "dtype": "int8"},
        {"shape": [8], "smooth": [{"kind": "x"}]},
        {"shape": [12], "nonsmooth": {"kind": "wavelet_l1", "levels": 3}},
        {"shape": [8], "step": -1},
        {"shape": [8], "smooth": [{"kind": "quadratic", "operator": {"kind": "warp"}}]},
    ],
)
def test_bad_specs_name_the_field(bad):
    with pytest.raises(FlowSpecError, match="flow|operator"):
        run_flow(bad, np.zeros(8, np.float32), iters=1)


def test_last_good_tag_moves_to_the_newest_green_checkpoint(tmp_path, example):
    spec, y, _ = example
    mgr = CheckpointManager(tmp_path / "s")
    run_flow(spec, y, iters=300, checkpoint_manager=mgr, run_id="g")
    assert mgr.tagged("last-good", run_id="g") == {"g-i000000000300": ["last-good"]}
    resume_flow("g-i000000000300", mgr, remaining_iters=100)
    assert mgr.tagged("last-good", run_id="g") == {"g-i000000000400": ["last-good"]}
    # a run whose certificates are not GREEN gets no last-good tag
    red = {**spec, "step": 2.5 / compute_certificates(build_flow(spec))["lipschitz"]}
    with pytest.raises(FlowDivergedError):
        run_flow(red, y, iters=3000, checkpoint_manager=mgr, run_id="red", checkpoint_interval=10)
    assert mgr.tagged("last-good", run_id="red") == {}


@pytest.mark.parametrize("signal_after", [99, 129], ids=["on-a-checkpoint-step", "between-checkpoints"])
def test_a_signal_stops_the_run_and_its_checkpoint_says_so(tmp_path, example, signal_after):
    """SIGINT delivered for real during iteration ``signal_after + 1``: the run checkpoints that
    iteration and stops, and the checkpoint's events end in RUN_INTERRUPTED, CHECKPOINT_CREATED
    whether or not the step was a periodic checkpoint anyway."""
    import signal

    spec, y, _ = example
    mgr = CheckpointManager(tmp_path / "s")

    def progress(p):
        if p["iter"] == signal_after:
            signal.raise_signal(signal.SIGINT)

    r = run_flow(spec, y, iters=300, checkpoint_manager=mgr, checkpoint_interval=50, run_id="r", progress=progress)
    stop = signal_after + 1
    assert r.status == "interrupted" and r.iteration == stop and r.signal == signal.SIGINT
    assert r.last_checkpoint == f"r-i{stop:012d}"
    events = mgr.load_checkpoint(r.last_checkpoint)["telemetry"]["events"]
    assert [e["type"] for e in events][-2:] == ["RUN_INTERRUPTED", "CHECKPOINT_CREATED"], events
    assert events[-2]["iter"] == stop and events[-2]["payload"]["signal"] == "SIGINT"
