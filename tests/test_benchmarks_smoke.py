"""The benchmark scripts run end to end at their smallest sizes (exit 0, their tables printed).
The figures themselves are not checked here: they come from full-size runs (README, Performance)."""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


def _env() -> dict:
    # a user's environment: the test session's forced 8 host devices are not passed on
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_script(name: str, args: list[str], cwd, timeout: float = 120) -> str:
    p = subprocess.run(
        [sys.executable, os.path.join(BENCH, name), *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, f"{name} {args} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _load_bench_models():
    spec = importlib.util.spec_from_file_location("bench_models", os.path.join(BENCH, "bench_models.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_models"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_model_states_have_the_published_shapes():
    bm = _load_bench_models()

    def leaves(tree):
        return [x for v in tree.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    # GPT-2 small: 124,439,808 parameters, 148 tensors; params bf16 + Adam mu, nu f32 + 2 counts
    shapes = leaves(bm.gpt2_shapes())
    assert len(shapes) == 148 and sum(int(np.prod(s)) for s in shapes) == 124_439_808
    small = leaves(bm.gpt2_small(scale=0.01))
    assert len(small) == 446
    full_bytes = sum(int(np.prod(s)) for s in shapes) * (2 + 4 + 4) + 2 * 4
    assert abs(full_bytes / 2**30 - 1.16) < 0.01
    # ResNet-50: 25,557,032 parameters; hundreds of leaves, most of them BN vectors
    params, stats = bm.resnet50_shapes()
    assert sum(int(np.prod(s)) for s in leaves(params)) == 25_557_032
    n = len(leaves(bm.resnet50(scale=0.01)))
    assert n == 2 * len(leaves(params)) + len(leaves(stats)) + 2 == 430


def test_bench_models_smoke(tmp_path):
    out = run_script("bench_models.py", ["--smoke", "--dir", str(tmp_path)], tmp_path)
    for state in ("gpt2", "resnet50", "flow", "small", "1k"):
        assert f"== {state}:" in out
    assert out.count("median s") == 5 and "vs orbax" in out and "vs floor" in out
    for row in ("cfs durable", "cfs no fsync", "raw floor", "np.save+fdatasync", "cfs target=", "np.load+put"):
        assert row in out
    for row, module in (("orbax target=", "orbax.checkpoint"), ("safetensors+put", "safetensors")):
        line = [x for x in out.splitlines() if x.startswith("restore") and row in x][0]  # gpt2's
        installed = importlib.util.find_spec(module) is not None
        assert ("skipped (not installed)" in line) is not installed
    assert "fixed cost (50 leaves of 1 KiB" in out


def test_bench_models_memory_and_fsync_check_in_children(tmp_path):
    args = ["--smoke", "--states", "1k", "--leaves", "20", "--peers", "raw", "--memory", "--dir", str(tmp_path)]
    strace = (
        shutil.which("strace") is not None
        and subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"]).returncode == 0
    )
    if strace:
        args.append("--check-fsync")
    out = run_script("bench_models.py", args, tmp_path)
    assert "peak MiB" in out and "kernel-measured" in out
    assert "skipped (--peers)" in out
    if strace:
        # the floor fdatasyncs each of the 20 leaves and fsyncs 2 directories
        assert any(line.split() == ["raw", "floor", "fsync", "2,", "fdatasync", "20"] for line in out.splitlines())


@pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="bench_save_restore needs safetensors")
def test_bench_save_restore_smallest(tmp_path):
    out = run_script(
        "bench_save_restore.py",
        ["--size-gib", "0.0078125", "--leaves", "2", "--repeats", "1", "--no-orbax", "--dir", str(tmp_path)],
        tmp_path,
    )
    assert "cfs durable save" in out and "targets (ratio of speeds" in out


def test_bench_compression_smoke(tmp_path):
    out = run_script("bench_compression.py", ["--smoke"], tmp_path)
    assert "blosc-lz4" in out and "compressed" in out
    assert os.listdir(tmp_path) == []  # its work directory is removed


def test_bench_features_smoke(tmp_path):
    out = run_script("bench_features.py", ["--smoke", "--dir", str(tmp_path)], tmp_path)
    for row in ("incremental save", "70,000-sample flow recorder history", "lazy column slice", "list_checkpoints"):
        assert row in out
    assert os.listdir(tmp_path) == []  # its work directory is removed


def test_bench_flow_overhead_smallest(tmp_path):
    out = run_script(
        "bench_flow_overhead.py",
        ["--example", "deconv1d", "--iters", "20", "--every", "10", "--repeats", "1"],
        tmp_path,
    )
    assert "no checkpoints" in out and "checkpoint every 10" in out


def test_bench_multiprocess_smallest(tmp_path):
    out = run_script(
        "bench_multiprocess.py",
        ["--size-mib", "8", "--repeats", "1", "--processes", "1,2", "--dir", str(tmp_path)],
        tmp_path,
    )
    assert "1 process x 8 devices" in out and "2 processes x 4 devices" in out


@pytest.mark.skipif(
    importlib.util.find_spec("obstore") is None or importlib.util.find_spec("moto") is None,
    reason="bench_s3 needs obstore and moto",
)
def test_bench_s3_smallest(tmp_path):
    out = run_script(
        "bench_s3.py", ["--size-mib", "1", "--repeats", "1", "--list-count", "2", "--rtt-ms", "1"], tmp_path
    )
    assert "cfs save" in out and "raw PUT" in out
