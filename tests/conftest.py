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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto_server) on loopback, shared by the session."""
    from s3server import S3Server

    with S3Server() as srv:
        yield srv


@pytest.fixture
def s3_url(s3_server, monkeypatch):
    """``s3://<fresh bucket>/ckpt`` with the standard AWS variables pointing at the server."""
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return f"s3://{s3_server.new_bucket()}/ckpt"
