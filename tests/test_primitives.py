"""The flow primitives and energies: orthonormality, exact inversion, prox optimality, descent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from computable_flows_shim import F_Dis, F_Multi, F_Proj, build_flow, make_example, run_flow, soft_threshold


@pytest.mark.parametrize("shape,levels", [((64,), 1), ((64,), 6), ((32, 16), 3), ((8, 8), 3), ((4096,), 5)])
def test_f_multi_is_orthonormal_and_inverts(shape, levels):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape))
    c = F_Multi.forward(x, levels)
    assert float(jnp.abs(jnp.linalg.norm(c) - jnp.linalg.norm(x))) < 1e-10 * float(jnp.linalg.norm(x))
    np.testing.assert_allclose(np.asarray(F_Multi.inverse(c, levels)), np.asarray(x), atol=1e-12)


@pytest.mark.parametrize("shape,levels", [((16,), 3), ((8, 4), 2)])
def test_f_multi_matrix_is_orthogonal(shape, levels):
    n = int(np.prod(shape))
    w = np.stack([np.asarray(F_Multi.forward(jnp.eye(n)[i].reshape(shape), levels)).reshape(-1) for i in range(n)])
    np.testing.assert_allclose(w @ w.T, np.eye(n), atol=1e-12)
    # a constant signal has only coarse (averaging) coefficients, each sqrt(n / coarse block size)
    const = np.array(F_Multi.forward(jnp.ones(shape), levels))
    block = tuple(slice(0, s >> levels) for s in shape)
    coarse = const[block]
    np.testing.assert_allclose(coarse, np.sqrt(n / coarse.size), rtol=1e-12)
    const[block] = 0
    np.testing.assert_allclose(const, 0, atol=1e-12)


def test_f_multi_refuses_indivisible_shapes():
    with pytest.raises(ValueError, match="divisible"):
        F_Multi.forward(jnp.ones(12), 3)


def test_soft_threshold_satisfies_prox_optimality():
    rng = np.random.default_rng(1)
    v = jnp.asarray(rng.standard_normal(1000) * 2)
    t = 0.7
    x = soft_threshold(v, t)
    # 0 in x - v + t * d|x|: for x != 0, x - v + t*sign(x) == 0; for x == 0, |v| <= t
    nz = np.asarray(x) != 0
    np.testing.assert_allclose(np.asarray(x - v + t * jnp.sign(x))[nz], 0, atol=1e-12)
    assert np.all(np.abs(np.asarray(v))[~nz] <= t + 1e-12)
    # and it minimises t|x| + 1/2 (x - v)^2 against perturbations
    obj = lambda z: t * jnp.abs(z) + 0.5 * (z - v) ** 2
    for d in (1e-3, -1e-3):
        assert np.all(np.asarray(obj(x)) <= np.asarray(obj(x + d)) + 1e-15)


def test_wavelet_prox_is_prox_in_w_space():
    rng = np.random.default_rng(2)
    v = jnp.asarray(rng.standard_normal((16, 16)))
    x = F_Proj(v, 0.3, levels=2)
    c, cv = F_Multi.forward(x, 2), F_Multi.forward(v, 2)
    np.testing.assert_allclose(np.asarray(c), np.asarray(soft_threshold(cv, 0.3)), atol=1e-12)


def test_f_dis_is_a_gradient_step():
    x = jnp.arange(5.0)
    out = F_Dis(x, jnp.asarray(0.1), lambda z: 2 * z)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x * 0.8))


@pytest.mark.parametrize("name", ["deconv1d", "deblur2d"])
def test_energy_decreases_monotonically_on_convex_examples(name):
    spec, y, _ = make_example(name)
    r = run_flow(spec, y, iters=60)
    e = r.telemetry["E"]
    assert np.all(np.diff(e) <= 1e-6 * np.abs(e[:-1])), np.diff(e).max()
    flow = build_flow(spec)
    e0 = float(flow.energy(jnp.zeros(flow.shape, flow.dtype), jnp.asarray(y)))  # energy at the start, x = 0
    assert e[0] <= e0 and e[-1] < 0.9 * e0
    assert set(r.telemetry["phase"]) == {"GREEN"}


def test_gradient_matches_autodiff():
    flow = build_flow(
        {
            "shape": [32],
            "dtype": "float64",
            "smooth": [
                {
                    "kind": "quadratic",
                    "operator": {
                        "kind": "compose",
                        "ops": [{"kind": "blur", "sigma": 1.0}, {"kind": "subsample", "factor": 2}],
                    },
                },
                {"kind": "tikhonov", "lam": 0.1},
            ],
        }
    )
    rng = np.random.default_rng(3)
    x, y = jnp.asarray(rng.standard_normal(32)), jnp.asarray(rng.standard_normal(16))
    np.testing.assert_allclose(
        np.asarray(flow.grad_smooth(x, y)), np.asarray(jax.grad(lambda z: flow.smooth_energy(z, y))(x)), atol=1e-12
    )
