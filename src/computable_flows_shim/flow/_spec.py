"""A flow: an energy ``E(x) = f(x) + g(x)`` to minimise by forward-backward splitting,
built from a plain-data spec (so ``flow_config`` alone rebuilds it).

Spec (JSON)::

    {
      "shape": [4096],                 # the unknown x
      "dtype": "float32",              # float32 or float64
      "smooth": [                      # f: differentiable terms
        {"kind": "quadratic", "operator": {"kind": "blur", "sigma": 2.0}, "weight": 1.0},  # w/2 ||A x - y||^2
        {"kind": "tikhonov", "lam": 1e-3}                                                  # lam/2 ||x||^2
      ],
      "nonsmooth": {"kind": "wavelet_l1", "lam": 0.01, "levels": 5},   # g: or {"kind": "l1", ...} or null
      "step": "certified",             # alpha = 1/L from the certificates, or a number
      "noise": 0.0                     # optional Langevin-style noise: sqrt(2 alpha) * noise * N(0, 1)
    }

The observed data ``y`` of the quadratic term is part of the flow *state*, not the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from computable_flows_shim.errors import FlowSpecError
from computable_flows_shim.flow._operators import LinearOperator, build_operator
from computable_flows_shim.flow._primitives import F_Dis, F_Multi, F_Proj

DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def _num(spec: dict, key: str, default: float, where: str) -> float:
    v = spec.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise FlowSpecError(f"{where}.{key}: expected a finite number >= 0, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Flow:
    """A built flow.  ``step`` is the jitted forward-backward step used by the engine."""

    spec: dict
    shape: tuple[int, ...]
    dtype: Any
    op: LinearOperator
    weight: float
    tikhonov: float
    prox_kind: str | None
    lam: float
    levels: int
    noise: float

    # ---------------------------------------------------------- energies
    def smooth_energy(self, x: jax.Array, y: jax.Array) -> jax.Array:
        r = self.op.apply(x) - y
        return 0.5 * self.weight * jnp.sum(r * r) + 0.5 * self.tikhonov * jnp.sum(x * x)

    def grad_smooth(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.weight * self.op.adjoint(self.op.apply(x) - y) + self.tikhonov * x

    def hessian_matvec(self, v: jax.Array) -> jax.Array:
        """``H v`` for the (constant) Hessian of the smooth part."""
        return self.weight * self.op.adjoint(self.op.apply(v)) + self.tikhonov * v

    def coefficients(self, x: jax.Array) -> jax.Array:
        return F_Multi.forward(x, self.levels) if self.prox_kind == "wavelet_l1" else x

    def nonsmooth_energy(self, x: jax.Array) -> jax.Array:
        if self.prox_kind is None:
            return jnp.zeros((), x.dtype)
        return self.lam * jnp.sum(jnp.abs(self.coefficients(x)))

    def energy(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.smooth_energy(x, y) + self.nonsmooth_energy(x)

    # ---------------------------------------------------------- the step
    def make_step(self):
        """The jitted step ``(x, y, key, alpha) -> (x, key, E, grad_norm, sparsity)``."""
        levels = self.levels if self.prox_kind == "wavelet_l1" else 0

        def step(x, y, key, alpha):
            v = F_Dis(x, alpha, lambda z: self.grad_smooth(z, y))
            key, sub = jax.random.split(key)
            if self.noise:
                v = v + jnp.sqrt(2 * alpha) * self.noise * jax.random.normal(sub, x.shape, x.dtype)
            x_new = F_Proj(v, alpha * self.lam, levels) if self.prox_kind else v
            e = self.energy(x_new, y)
            # norm of the gradient mapping (x - x_new) / alpha: zero exactly at a minimiser
            gnorm = jnp.linalg.norm((x - x_new) / alpha)
            sparsity = jnp.mean((self.coefficients(x_new) == 0).astype(x.dtype))
            return x_new, key, e, gnorm, sparsity

        return jax.jit(step)


def build_flow(spec: dict) -> Flow:
    """Check a spec and build its :class:`Flow` (raises FlowSpecError naming the field)."""
    if not isinstance(spec, dict):
        raise FlowSpecError(f"flow spec must be a dict, got {type(spec).__name__}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 2 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise FlowSpecError(f"flow.shape: expected [n] or [h, w] with positive ints, got {shape!r}")
    dtype_name = spec.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise FlowSpecError(f"flow.dtype: expected one of {sorted(DTYPES)}, got {dtype_name!r}")
    dtype = DTYPES[dtype_name]
    if dtype_name == "float64" and not jax.config.read("jax_enable_x64"):
        raise FlowSpecError("flow.dtype 'float64' needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))")
    op, weight, tik = None, 0.0, 0.0
    for i, term in enumerate(spec.get("smooth") or []):
        where = f"flow.smooth[{i}]"
        kind = term.get("kind") if isinstance(term, dict) else None
        if kind == "quadratic":
            if op is not None:
                raise FlowSpecError(f"{where}: only one quadratic data term is supported")
            op = build_operator(term.get("operator", {"kind": "identity"}), tuple(shape), dtype)
            weight = _num(term, "weight", 1.0, where)
        elif kind == "tikhonov":
            tik += _num(term, "lam", 0.0, where)
        else:
            raise FlowSpecError(f"{where}.kind: expected 'quadratic' or 'tikhonov', got {kind!r}")
    if op is None:
        op = build_operator({"kind": "identity"}, tuple(shape), dtype)
        weight = 0.0
    ns = spec.get("nonsmooth")
    prox_kind, lam, levels = None, 0.0, 0
    if ns is not None:
        kind = ns.get("kind") if isinstance(ns, dict) else None
        if kind not in ("l1", "wavelet_l1"):
            raise FlowSpecError(f"flow.nonsmooth.kind: expected 'l1' or 'wavelet_l1', got {kind!r}")
        prox_kind, lam = kind, _num(ns, "lam", 0.0, "flow.nonsmooth")
        if kind == "wavelet_l1":
            levels = ns.get("levels", 1)
            if not isinstance(levels, int) or levels < 1 or any(n % (1 << levels) for n in shape):
                raise FlowSpecError(
                    f"flow.nonsmooth.levels: need 1 <= levels with shape {shape} divisible by 2**levels"
                )
    step = spec.get("step", "certified")
    if step != "certified" and (isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0):
        raise FlowSpecError(f"flow.step: expected 'certified' or a positive number, got {step!r}")
    noise = _num(spec, "noise", 0.0, "flow")
    return Flow(spec, tuple(shape), dtype, op, weight, tik, prox_kind, lam, levels, noise)


def as_array(flow: Flow, a: Any, name: str) -> jax.Array:
    arr = np.asarray(a)
    if arr.shape != tuple(flow.op.out_shape if name == "y" else flow.shape):
        raise FlowSpecError(
            f"{name}: expected shape {flow.op.out_shape if name == 'y' else flow.shape}, got {arr.shape}"
        )
    return jnp.asarray(arr, dtype=flow.dtype)
