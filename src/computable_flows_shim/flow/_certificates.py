"""Certificates of a flow, computed once at the start and stored in the checkpoint.

- ``lipschitz``: L, the largest eigenvalue of the smooth part's Hessian H.
- ``gamma``: the smallest eigenvalue of H (strong convexity; the spectral gap above 0).
- ``eta_dd``: the diagonal-dominance ratio of H, ``max_i sum_{j != i} |H_ij| / |H_ii|``
  (< 1: strictly diagonally dominant, so Jacobi-type splittings converge too).
- ``alpha``: the step size they justify, ``1/L`` (forward-backward is monotone for alpha <= 1/L).
- ``phase``: GREEN (gamma/L >= 1e-6: strongly convex, linear rate), AMBER (merely convex),
  RED (no finite L, or a fixed step above 2/L that the certificates do not justify).

Small problems (n <= 2048) form H densely and use an exact symmetric eigensolver;
larger ones use deterministic power iteration (fixed key and iteration count) and
estimate eta_dd from 64 evenly spaced rows.  ``method`` says which.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from computable_flows_shim.flow._spec import Flow

DENSE_MAX = 2048
POWER_ITERS = 200
SAMPLED_ROWS = 64
GREEN_RATIO = 1e-6


def _rows(flow: Flow, idx: np.ndarray) -> np.ndarray:
    n = math.prod(flow.shape)
    basis = jnp.zeros((len(idx), n), flow.dtype).at[jnp.arange(len(idx)), jnp.asarray(idx)].set(1)
    rows = jax.vmap(lambda e: flow.hessian_matvec(e.reshape(flow.shape)).reshape(-1))(basis)
    return np.asarray(rows, dtype=np.float64)


def _eta(rows: np.ndarray, idx: np.ndarray) -> float:
    diag = np.abs(rows[np.arange(len(idx)), idx])
    off = np.abs(rows).sum(axis=1) - diag
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diag > 0, off / np.where(diag > 0, diag, 1), np.inf)
    return float(ratio.max()) if len(ratio) else 0.0


def _power(matvec, shape, dtype, iters: int, seed: int) -> float:
    v = jax.random.normal(jax.random.key(seed), shape, dtype)

    def body(_, v):
        w = matvec(v)
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(dtype).tiny)

    v = jax.lax.fori_loop(0, iters, body, v / jnp.linalg.norm(v))
    return float(jnp.vdot(v, matvec(v)))


def compute_certificates(flow: Flow) -> dict:
    n = math.prod(flow.shape)
    if n <= DENSE_MAX:
        idx = np.arange(n)
        h = _rows(flow, idx)
        eig = np.linalg.eigvalsh(0.5 * (h + h.T))
        lip, gamma, eta, method = float(eig[-1]), float(eig[0]), _eta(h, idx), "dense-eigh"
    else:
        idx = np.linspace(0, n - 1, SAMPLED_ROWS).round().astype(np.int64)
        eta = _eta(_rows(flow, idx), idx)
        mv = jax.jit(flow.hessian_matvec)
        lip = _power(mv, flow.shape, flow.dtype, POWER_ITERS, 0)
        shift = jax.jit(lambda v: lip * v - flow.hessian_matvec(v))
        gamma = lip - _power(shift, flow.shape, flow.dtype, POWER_ITERS, 1)
        method = f"power-iteration-{POWER_ITERS}/sampled-rows-{SAMPLED_ROWS}"
    gamma = max(gamma, 0.0) if abs(gamma) <= 1e-9 * max(abs(lip), 1.0) else gamma
    step = flow.spec.get("step", "certified")
    if not math.isfinite(lip) or lip <= 0:
        alpha = float(step) if step != "certified" else 1.0
        phase = "RED" if not math.isfinite(lip) else "AMBER"
    else:
        alpha = 1.0 / lip if step == "certified" else float(step)
        if alpha > 2.0 / lip:
            phase = "RED"
        elif gamma / lip >= GREEN_RATIO:
            phase = "GREEN"
        else:
            phase = "AMBER"
    return {
        "eta_dd": eta,
        "gamma": gamma,
        "lipschitz": lip,
        "alpha": alpha,
        "phase": phase,
        "method": method,
        "condition_number": (lip / gamma) if gamma > 0 else None,
    }
