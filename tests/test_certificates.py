"""Certificates on operators whose Hessian spectra are known exactly."""

import numpy as np
import pytest

from computable_flows_shim import build_flow, compute_certificates
from computable_flows_shim.flow._operators import _circulant_spectrum, gaussian_kernel


def spec(op, n=256, tik=0.0, step="certified"):
    return {
        "shape": [n],
        "dtype": "float64",
        "step": step,
        "smooth": [{"kind": "quadratic", "operator": op, "weight": 2.0}, {"kind": "tikhonov", "lam": tik}],
    }


def test_identity_is_perfectly_conditioned():
    c = compute_certificates(build_flow(spec({"kind": "identity"}, tik=0.5)))
    assert c["lipschitz"] == pytest.approx(2.5) and c["gamma"] == pytest.approx(2.5)
    assert c["eta_dd"] == 0.0 and c["alpha"] == pytest.approx(1 / 2.5) and c["phase"] == "GREEN"


@pytest.mark.parametrize("n", [256, 4096])  # dense eigensolver and power iteration
def test_blur_spectrum_matches_the_fft(n):
    c = compute_certificates(build_flow(spec({"kind": "blur", "sigma": 2.0, "size": 13}, n=n, tik=0.05)))
    eig = 2.0 * np.abs(_circulant_spectrum(gaussian_kernel(2.0, 13, 1), (n,))) ** 2 + 0.05
    tol = 1e-9 if n <= 2048 else 1e-2
    assert c["lipschitz"] == pytest.approx(eig.max(), rel=tol)
    assert c["gamma"] == pytest.approx(eig.min(), rel=tol if n <= 2048 else 0.5)
    # circulant: every row of H = 2 A^T A + 0.05 I is the same autocorrelation
    k = gaussian_kernel(2.0, 13, 1)
    auto = 2.0 * np.correlate(k, k, mode="full")
    auto[len(k) - 1] += 0.05
    want = (np.abs(auto).sum() - auto[len(k) - 1]) / auto[len(k) - 1]
    assert c["eta_dd"] == pytest.approx(want, rel=1e-6)


def test_subsampling_is_only_convex():
    c = compute_certificates(build_flow(spec({"kind": "subsample", "factor": 2})))
    assert c["lipschitz"] == pytest.approx(2.0) and abs(c["gamma"]) < 1e-12
    assert c["phase"] == "AMBER" and c["condition_number"] is None


def test_a_step_above_two_over_l_is_red():
    c = compute_certificates(build_flow(spec({"kind": "identity"}, step=1.5)))
    assert c["lipschitz"] == pytest.approx(2.0) and c["alpha"] == 1.5 and c["phase"] == "RED"
