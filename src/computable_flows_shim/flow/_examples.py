"""Built-in example flows: a spec (plain data) plus synthetic observed data.

``deblur2d`` (the default): a piecewise-constant 256x256 image, blurred by a Gaussian
(sigma 2) with 1% noise, restored by wavelet-L1 (Haar, 4 levels) plus a small Tikhonov
term: a sparse deconvolution sized to run for tens of seconds on two CPU cores.
``deconv1d``: a 4096-sample piecewise-constant signal, blurred (sigma 3), restored the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from computable_flows_shim.flow._spec import build_flow


def _piecewise_image(n: int, rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((n, n))
    for _ in range(12):
        r0, c0 = rng.integers(0, n - n // 4, size=2)
        h, w = rng.integers(n // 16, n // 3, size=2)
        img[r0 : r0 + h, c0 : c0 + w] += rng.uniform(-1, 1)
    return img


def _piecewise_signal(n: int, rng: np.random.Generator) -> np.ndarray:
    cuts = np.sort(rng.integers(0, n, size=20))
    x = np.zeros(n)
    for a, b in zip(cuts[:-1], cuts[1:]):
        x[a:b] = rng.uniform(-1, 1)
    return x


EXAMPLES: dict[str, dict[str, Any]] = {
    "deblur2d": {
        "spec": {
            "shape": [256, 256],
            "dtype": "float32",
            "smooth": [
                {"kind": "quadratic", "operator": {"kind": "blur", "sigma": 2.0, "size": 13}, "weight": 1.0},
                {"kind": "tikhonov", "lam": 1e-4},
            ],
            "nonsmooth": {"kind": "wavelet_l1", "lam": 2e-3, "levels": 4},
            "step": "certified",
        },
        "iters": 8000,
        "noise": 0.01,
    },
    "deconv1d": {
        "spec": {
            "shape": [4096],
            "dtype": "float32",
            "smooth": [
                {"kind": "quadratic", "operator": {"kind": "blur", "sigma": 3.0, "size": 19}},
                {"kind": "tikhonov", "lam": 1e-3},
            ],
            "nonsmooth": {"kind": "wavelet_l1", "lam": 0.01, "levels": 6},
            "step": "certified",
        },
        "iters": 2000,
        "noise": 0.02,
    },
}
DEFAULT_EXAMPLE = "deblur2d"


def make_example(name: str = DEFAULT_EXAMPLE, seed: int = 0) -> tuple[dict, np.ndarray, int]:
    """``(spec, y, default_iters)`` for a built-in example."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose from {sorted(EXAMPLES)}")
    ex = EXAMPLES[name]
    spec = dict(ex["spec"])
    flow = build_flow(spec)
    rng = np.random.default_rng(seed)
    shape = tuple(spec["shape"])
    truth = _piecewise_image(shape[0], rng) if len(shape) == 2 else _piecewise_signal(shape[0], rng)
    clean = np.asarray(flow.op.apply(np.asarray(truth, np.float32)))
    y = clean + ex["noise"] * rng.standard_normal(clean.shape)
    return spec, y.astype(np.float32), ex["iters"]
