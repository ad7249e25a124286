"""The flow primitives, JAX-jitted and pure.

- ``F_Dis``: the dissipative (gradient) step on the smooth part, ``x - alpha * grad f(x)``.
- ``F_Proj``: the proximal step on the non-smooth part (soft-thresholding for L1).
- ``F_Multi``: the orthonormal multiscale Haar wavelet transform, 1-D and 2-D, any number
  of levels (``F_Multi.forward`` / ``F_Multi.inverse``); orthonormal, so the prox of
  ``lam * ||W x||_1`` is ``W^T soft(W v, alpha * lam)``.

A flow step is forward-backward splitting: ``F_Proj(F_Dis(x))``, the prox optionally
taken in wavelet space through ``F_Multi``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

_S = 1.0 / math.sqrt(2.0)


@partial(jax.jit, static_argnames=("grad_f",))
def F_Dis(x: jax.Array, alpha: jax.Array, grad_f: Callable[[jax.Array], jax.Array]) -> jax.Array:  # noqa: N802
    """Gradient step on the smooth part: ``x - alpha * grad_f(x)``."""
    return x - alpha * grad_f(x)


@jax.jit
def soft_threshold(v: jax.Array, t: jax.Array) -> jax.Array:
    """The prox of ``t * ||.||_1``: ``sign(v) * max(|v| - t, 0)``."""
    return jnp.sign(v) * jnp.maximum(jnp.abs(v) - t, jnp.zeros_like(v))


@partial(jax.jit, static_argnames=("levels",))
def F_Proj(v: jax.Array, threshold: jax.Array, levels: int = 0) -> jax.Array:  # noqa: N802
    """Proximal step of ``lam * ||W v||_1`` with ``threshold = alpha * lam``.

    ``levels == 0`` means plain L1 (W = identity); otherwise the Haar transform with
    that many levels, so the step is ``W^T soft(W v, threshold)``."""
    if levels == 0:
        return soft_threshold(v, threshold)
    return F_Multi.inverse(soft_threshold(F_Multi.forward(v, levels), threshold), levels)


def _haar_axis(x: jax.Array, axis: int) -> jax.Array:
    """One Haar level along ``axis``: [averages | details], each half the length."""
    even = jnp.take(x, jnp.arange(0, x.shape[axis], 2), axis=axis)
    odd = jnp.take(x, jnp.arange(1, x.shape[axis], 2), axis=axis)
    return jnp.concatenate([(even + odd) * _S, (even - odd) * _S], axis=axis)


def _ihaar_axis(y: jax.Array, axis: int) -> jax.Array:
    n = y.shape[axis] // 2
    a = jax.lax.slice_in_dim(y, 0, n, axis=axis)
    d = jax.lax.slice_in_dim(y, n, 2 * n, axis=axis)
    even, odd = (a + d) * _S, (a - d) * _S
    stacked = jnp.stack([even, odd], axis=axis + 1)
    shape = list(y.shape)
    return stacked.reshape(shape)


def _check_levels(shape: tuple[int, ...], levels: int) -> None:
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    for n in shape:
        if n % (1 << levels):
            raise ValueError(
                f"F_Multi: every dimension must be divisible by 2**levels={1 << levels}, got shape {shape}"
            )


class F_Multi:  # noqa: N801
    """Orthonormal multiscale Haar transform of 1-D or 2-D arrays (Mallat layout)."""

    @staticmethod
    @partial(jax.jit, static_argnames=("levels",))
    def forward(x: jax.Array, levels: int) -> jax.Array:
        """Coefficients in the Mallat layout: the coarsest averages first (top-left in 2-D)."""
        _check_levels(x.shape, levels)
        out = x
        for lev in range(levels):
            n = [s >> lev for s in x.shape]
            block = out[tuple(slice(0, k) for k in n)]
            for axis in range(x.ndim):
                block = _haar_axis(block, axis)
            out = out.at[tuple(slice(0, k) for k in n)].set(block)
        return out

    @staticmethod
    @partial(jax.jit, static_argnames=("levels",))
    def inverse(c: jax.Array, levels: int) -> jax.Array:
        """Inverse of :meth:`forward` (its transpose: the transform is orthonormal)."""
        _check_levels(c.shape, levels)
        out = c
        for lev in reversed(range(levels)):
            n = [s >> lev for s in c.shape]
            block = out[tuple(slice(0, k) for k in n)]
            for axis in reversed(range(c.ndim)):
                block = _ihaar_axis(block, axis)
            out = out.at[tuple(slice(0, k) for k in n)].set(block)
        return out
