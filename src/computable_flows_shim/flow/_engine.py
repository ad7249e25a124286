"""The flow engine: ``run_flow`` and ``resume_flow``.

A run is a loop of jitted forward-backward steps.  Every ``checkpoint_interval``
iterations, at the end, and when SIGINT/SIGTERM arrives, it saves a checkpoint
holding everything needed to continue bit-identically: the state (x, the observed
data y, the PRNG key, the step size), the flow spec (``flow_config``), the
certificates, the run parameters (``metadata``) and the telemetry so far.
``resume_flow`` rebuilds the flow from that checkpoint alone.
"""

from __future__ import annotations

import datetime as _dt
import math
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim._types import CheckpointId, RunId
from computable_flows_shim.checkpoints._manager import CheckpointManager
from computable_flows_shim.errors import CheckpointExistsError, FlowDivergedError, FlowSpecError
from computable_flows_shim.flow._certificates import compute_certificates
from computable_flows_shim.flow._recorder import TelemetryRecorder
from computable_flows_shim.flow._spec import Flow, as_array, build_flow

LAST_GOOD = "last-good"
"""The tag the runtime keeps on each run's newest checkpoint saved in a GREEN phase."""
TAG_EVERY_S = 10.0
"""While a run goes on, ``last-good`` moves at most this often (each move syncs three directories:
about 30 ms here, 8% of the default flow when it moved at every checkpoint); the end of a run,
a divergence and an interruption move it at once.  After a hard kill it may lag by this much
(it still names a checkpoint saved GREEN)."""

Progress = Callable[[dict], None]
"""Called after every iteration with ``{"iter", "end", "E", "phase", "checkpoint"}``."""


@dataclass
class FlowResult:
    """What a run returns: the final state and telemetry, and how it ended."""

    state: dict
    telemetry: dict
    run_id: RunId
    iteration: int
    status: str  # "finished" or "interrupted"
    certificates: dict
    last_checkpoint: CheckpointId | None = None
    checkpoints: list[CheckpointId] = field(default_factory=list)
    signal: int | None = None

    @property
    def resume_hint(self) -> str:
        return f"cfs resume {self.last_checkpoint or self.run_id}"


def _new_run_id() -> str:
    return "run-" + _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


class _Signals:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, checkpoints and stops.
    A second signal restores the default behaviour (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


def _phase(cert_phase: str, e: float, prev_e: float | None) -> str:
    if prev_e is not None and e > prev_e + 1e-6 * max(abs(prev_e), 1.0):
        return "RED"  # the energy went up: the step is not behaving as certified
    return cert_phase


@dataclass
class _Run:
    """One run of the loop: what stays fixed while it iterates, and its checkpoint books."""

    flow: Flow
    y: jax.Array
    rec: TelemetryRecorder
    certs: dict
    mgr: CheckpointManager | None
    run_id: str
    interval: int
    meta: dict
    progress: Progress | None
    checkpoints: list[str] = field(default_factory=list)
    last: str | None = None
    good: list[str] = field(default_factory=list)  # checkpoints saved while certificates and energy were GREEN
    tagged_at: float = -math.inf  # time.monotonic() of the last move of the last-good tag

    def mark_last_good(self) -> None:
        """Move the run's ``last-good`` tag to its newest committed GREEN checkpoint."""
        mgr = self.mgr
        if mgr is None:
            return
        mgr.wait_until_finished()  # the tag names committed checkpoints only
        self.tagged_at = time.monotonic()
        if not self.good:
            return
        newest = self.good[-1]
        for old in mgr.tagged(LAST_GOOD, run_id=self.run_id):
            if old != newest:
                mgr.untag_checkpoint(old, LAST_GOOD)
        mgr.tag_checkpoint(newest, LAST_GOOD)

    def save(self, it: int, phase: str, x: jax.Array, key: jax.Array, alpha: jax.Array) -> None:
        if self.mgr is None:
            return
        if time.monotonic() - self.tagged_at >= TAG_EVERY_S:
            self.mark_last_good()  # the previous save has committed by now (one save in flight)
        cid = S.make_checkpoint_id(self.run_id, it)
        self.rec.event("CHECKPOINT_CREATED", it, checkpoint_id=cid)  # logged first: the checkpoint holds its own event
        state = {"x": x, "y": self.y, "key": key, "alpha": alpha}
        # blocking=False: the state is copied to host memory now and written while the flow goes on
        self.mgr.create_checkpoint(
            self.run_id,
            it,
            state,
            self.flow.spec,
            telemetry_history=self.rec.history(),
            certificates=self.certs,
            metadata=self.meta,
            blocking=False,
        )
        self.checkpoints.append(cid)
        self.last = cid
        if phase == "GREEN" and self.certs["phase"] == "GREEN":
            self.good.append(cid)

    def diverged(self, it: int, e_val: float) -> FlowDivergedError:
        self.rec.event("DIVERGED", it, E=str(e_val))
        self.mark_last_good()  # committed and tagged before we report it
        certs = self.certs
        return FlowDivergedError(
            f"run {self.run_id!r} diverged at iteration {it}: energy {e_val}; the state was not checkpointed. "
            + (f"Last good checkpoint: {self.last}." if self.last else "No checkpoint was written.")
            + f" Certified step alpha = {certs['alpha']:.6g} (L = {certs['lipschitz']:.6g}).",
            it,
            self.last,
        )

    def loop(self, x: jax.Array, key: jax.Array, alpha: jax.Array, start: int, end: int) -> FlowResult:
        step = self.flow.make_step()
        rec, certs, y = self.rec, self.certs, self.y
        prev_e = float(rec.history()["E"][-1]) if len(rec) else None
        it = start
        with _Signals() as sigs:
            while it < end:
                x_new, key_new, e, gnorm, sparsity = step(x, y, key, alpha)
                e_val = float(e)
                if not math.isfinite(e_val):
                    raise self.diverged(it + 1, e_val)
                x, key, it = x_new, key_new, it + 1
                ph = _phase(certs["phase"], e_val, prev_e)
                prev_e = e_val
                if rec.wants(it):
                    rec.record(
                        it,
                        E=e_val,
                        grad_norm=float(gnorm),
                        alpha=float(alpha),
                        phase=ph,
                        sparsity_wx=float(sparsity),
                        eta_dd=certs["eta_dd"],
                        gamma=certs["gamma"],
                    )
                stop = sigs.received is not None
                if it % self.interval == 0 or it == end or stop:
                    if stop and it != end:  # on a checkpoint step too: the checkpoint says why the run stopped
                        rec.event("RUN_INTERRUPTED", it, signal=signal.Signals(sigs.received).name)  # type: ignore[arg-type]
                    if it == end:
                        rec.event("RUN_FINISHED", it)
                    self.save(it, ph, x, key, alpha)
                if self.progress is not None:
                    self.progress({"iter": it, "end": end, "E": e_val, "phase": ph, "checkpoint": self.last})
                if stop:
                    break
        if self.mgr is not None:
            self.mgr.wait_until_finished()
            self.mark_last_good()
        status = "finished" if it == end else "interrupted"
        state = {"x": np.asarray(x), "y": np.asarray(y), "key": key, "alpha": np.asarray(alpha)}
        return FlowResult(
            state, rec.history(), self.run_id, it, status, certs, self.last, self.checkpoints, sigs.received
        )


def run_flow(
    flow_config: dict,
    y: Any,
    *,
    iters: int,
    x0: Any = None,
    seed: int = 0,
    checkpoint_manager: CheckpointManager | None = None,
    checkpoint_interval: int = 100,
    run_id: RunId | None = None,
    telemetry_every: int = 1,
    progress: Progress | None = None,
) -> FlowResult:
    """Run a flow for ``iters`` iterations from ``x0`` (default: zeros).

    Checkpoints every ``checkpoint_interval`` iterations, at the end and on SIGINT/SIGTERM
    (then it returns with ``status == "interrupted"``).  Raises FlowDivergedError on a
    NaN/Inf energy without checkpointing the bad state.

    Example::

        >>> from computable_flows_shim import run_flow, make_example
        >>> spec, y, _ = make_example("denoise1d")
        >>> run_flow(spec, y, iters=5).telemetry["E"].shape
        (5,)
    """
    flow = build_flow(flow_config)
    if iters < 0 or checkpoint_interval < 1:
        raise FlowSpecError(f"need iters >= 0 and checkpoint_interval >= 1, got {iters} and {checkpoint_interval}")
    run_id = S.validate_run_id(run_id) if run_id is not None else _new_run_id()
    y_arr = as_array(flow, y, "y")
    x = jnp.zeros(flow.shape, flow.dtype) if x0 is None else as_array(flow, x0, "x0")
    certs = compute_certificates(flow)
    alpha = jnp.asarray(certs["alpha"], dtype=flow.dtype)
    rec = TelemetryRecorder(telemetry_every)
    rec.event("RUN_STARTED", 0, certificates=certs, iters=iters)
    meta = {
        "target_iters": iters,
        "checkpoint_interval": checkpoint_interval,
        "telemetry_every": telemetry_every,
        "seed": seed,
    }
    run = _Run(flow, y_arr, rec, certs, checkpoint_manager, run_id, checkpoint_interval, meta, progress)
    return run.loop(x, jax.random.key(seed), alpha, 0, iters)


def resume_flow(
    checkpoint_id: CheckpointId,
    checkpoint_manager: CheckpointManager,
    remaining_iters: int | None = None,
    *,
    progress: Progress | None = None,
) -> FlowResult:
    """Continue a run from a checkpoint, rebuilt from that checkpoint alone.

    Runs ``remaining_iters`` more iterations (default: up to the run's original
    ``iters``), checkpointing as the run did; bit-identical to never stopping."""
    ck = checkpoint_manager.load_checkpoint(checkpoint_id)
    later = [
        i.checkpoint_id for i in checkpoint_manager.list_checkpoints(ck["run_id"]) if i.iteration > ck["iteration"]
    ]
    if later:
        raise CheckpointExistsError(
            f"run {ck['run_id']!r} already has checkpoints after {checkpoint_id!r} ({', '.join(sorted(later)[:3])}"
            f"{', ...' if len(later) > 3 else ''}): resume from its latest checkpoint, or branch a new run with "
            f"rollback_to_checkpoint({checkpoint_id!r}, NEW_RUN) (cfs rollback {checkpoint_id} --to-run NEW_RUN)"
        )
    flow = build_flow(ck["flow_config"])
    meta = dict(ck["metadata"])
    start = ck["iteration"]
    end = start + remaining_iters if remaining_iters is not None else int(meta.get("target_iters", start))
    st = ck["state"]
    x, y = jnp.asarray(st["x"]), jnp.asarray(st["y"])
    alpha = jnp.asarray(st["alpha"])
    rec = TelemetryRecorder.from_history(ck["telemetry"], int(meta.get("telemetry_every", 1)))
    lineage = ck["lineage"]
    if lineage.get("rollback_from") and not any(e["type"] == "ROLLBACK" for e in rec.events[-1:]):
        rec.event("ROLLBACK", start, rollback_from=lineage["rollback_from"])
    rec.event("FLOW_RESUMED", start, checkpoint_id=checkpoint_id, end=end)
    meta["target_iters"] = end
    interval = int(meta.get("checkpoint_interval", 100))
    run = _Run(flow, y, rec, ck["certificates"], checkpoint_manager, ck["run_id"], interval, meta, progress)
    return run.loop(x, st["key"], alpha, start, end)
