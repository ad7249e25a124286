"""Strict JAX for every test: 8 CPU devices, 64-bit types on, strict promotion."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def mgr(tmp_path):
    from computable_flows_shim import CheckpointManager

    return CheckpointManager(tmp_path / "store")
