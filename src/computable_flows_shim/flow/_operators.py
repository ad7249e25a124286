"""Linear operators for data-fidelity terms, built from plain-data specs.

Each spec is JSON (so it lives in a checkpoint's ``flow_config``):

- ``{"kind": "identity"}``
- ``{"kind": "blur", "sigma": 2.0, "size": 9}``: circular convolution with a normalised
  Gaussian kernel (1-D or 2-D, by the signal's shape), applied with the FFT;
  ``{"kind": "blur", "kernel": [...]}`` for an explicit kernel.
- ``{"kind": "subsample", "factor": 2}``: keep every ``factor``-th sample on each axis.
- ``{"kind": "compose", "ops": [spec, ...]}``: applied first to last.

An operator is a pair ``(apply, adjoint)`` of jittable functions plus its output shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from computable_flows_shim.errors import FlowSpecError


@dataclass(frozen=True)
class LinearOperator:
    apply: Callable
    adjoint: Callable
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def gaussian_kernel(sigma: float, size: int, ndim: int) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    k1 = np.exp(-0.5 * (r / sigma) ** 2)
    k = k1
    for _ in range(ndim - 1):
        k = np.multiply.outer(k, k1)
    return k / k.sum()


def _circulant_spectrum(kernel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """FFT of the kernel placed (centred) on the circular grid of ``shape``."""
    if kernel.ndim != len(shape) or any(k > n for k, n in zip(kernel.shape, shape)):
        raise FlowSpecError(f"blur kernel of shape {kernel.shape} does not fit signals of shape {shape}")
    full = np.zeros(shape)
    full[tuple(slice(0, k) for k in kernel.shape)] = kernel
    full = np.roll(full, [-(k // 2) for k in kernel.shape], axis=tuple(range(len(shape))))
    return np.fft.rfftn(full)


def build_operator(spec: dict, shape: tuple[int, ...], dtype) -> LinearOperator:
    """The operator a spec describes, for signals of ``shape``."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise FlowSpecError(f"operator spec must be a dict with 'kind', got {spec!r}")
    kind = spec["kind"]
    axes = tuple(range(len(shape)))
    if kind == "identity":
        return LinearOperator(lambda x: x, lambda y: y, shape, shape)
    if kind == "blur":
        if "kernel" in spec:
            kernel = np.asarray(spec["kernel"], dtype=np.float64)
        else:
            sigma, size = (
                float(spec.get("sigma", 1.0)),
                int(spec.get("size", 0) or 2 * math.ceil(3 * spec.get("sigma", 1.0)) + 1),
            )
            kernel = gaussian_kernel(sigma, size, len(shape))
        spectrum = _circulant_spectrum(kernel, shape)
        cdtype = jnp.complex64 if jnp.dtype(dtype) == jnp.float32 else jnp.complex128
        h = jnp.asarray(spectrum, dtype=cdtype)
        hc = jnp.conj(h)

        def apply(x):
            return jnp.fft.irfftn(jnp.fft.rfftn(x, axes=axes) * h, s=shape, axes=axes).astype(x.dtype)

        def adjoint(y):
            return jnp.fft.irfftn(jnp.fft.rfftn(y, axes=axes) * hc, s=shape, axes=axes).astype(y.dtype)

        return LinearOperator(apply, adjoint, shape, shape)
    if kind == "subsample":
        f = int(spec.get("factor", 2))
        if f < 1:
            raise FlowSpecError(f"subsample factor must be >= 1, got {f}")
        sl = tuple(slice(None, None, f) for _ in shape)
        out_shape = tuple(math.ceil(n / f) for n in shape)
        return LinearOperator(lambda x: x[sl], lambda y: jnp.zeros(shape, y.dtype).at[sl].set(y), shape, out_shape)
    if kind == "compose":
        ops = []
        cur = shape
        for sub in spec.get("ops", []):
            op = build_operator(sub, cur, dtype)
            ops.append(op)
            cur = op.out_shape

        def apply_all(x):
            for op in ops:
                x = op.apply(x)
            return x

        def adjoint_all(y):
            for op in reversed(ops):
                y = op.adjoint(y)
            return y

        return LinearOperator(apply_all, adjoint_all, shape, cur)
    raise FlowSpecError(f"unknown operator kind {kind!r} (expected identity, blur, subsample or compose)")
