"""Checkpoint save/restore of model-shaped states against orbax-checkpoint, safetensors,
np.save/np.load and a raw floor, all measured in the same run: medians after a warm-up,
every run printed, ratios to orbax and to the floor in the same table.

    python benchmarks/bench_models.py                        # every state, 5 repeats
    python benchmarks/bench_models.py --states gpt2 --repeats 3
    python benchmarks/bench_models.py --states resnet50,flow --memory --check-fsync
    python benchmarks/bench_models.py --smoke                # tiny sizes, 1 run: what CI runs

States (random data, fixed seed; every leaf a numpy array, the same tree for every method):
  gpt2      GPT-2 small (vocab 50257, n_ctx 1024, d_model 768, 12 layers, 12 heads, MLP 3072; per
            layer ln_1, attn c_attn/c_proj, ln_2, mlp c_fc/c_proj; wte, wpe, ln_f): params bfloat16,
            Adam mu and nu float32, the Adam count and a schedule count (optax.chain(scale_by_adam,
            ..., scale_by_schedule) has both): 446 leaves, 1.16 GiB
  resnet50  ResNet-50 (bottleneck stages 3-4-6-3, widths 64-512, expansion 4, fc 2048x1000): params
            float32, batch_stats (BN mean/var), SGD momentum trace, count, step: 430 leaves, most of
            them tiny BN vectors, 0.19 GiB
  flow      the state the default flow (`cfs run`: the deblur2d example) checkpoints: x and y
            (256x256 float32, y from make_example), the PRNG key (its uint32 key data: the peers
            cannot store a typed key array) and the step size alpha
  small     10,000 leaves of 1-64 KiB, mixed dtypes (float32, bfloat16, float16, int32, int8, uint8; no
            float64: JAX without jax_enable_x64 would restore it as float32)
  1k        10,000 float32 leaves of 1 KiB: the fixed cost per leaf

Save methods:
  cfs durable        CheckpointManager(durable=True).create_checkpoint: on Linux >= 5.8 one syncfs of the
                     staging file system, then rename and fsync of the store directory (elsewhere fdatasync
                     of every file and fsync of every directory); a fresh run id each time: every byte written;
                     leaves of at most 64 KiB packed, one array per dtype (--pack-max-bytes 0: every leaf its own)
  cfs no fsync       the same with CheckpointManager(durable=False)
  orbax              orbax StandardCheckpointer().save + wait_until_finished, as shipped: fsyncs (its
                     tensorstore kvstore has file_io_sync on by default; --check-fsync counts them)
  safetensors        safetensors.numpy.save_file: no fsync (bfloat16 is stored natively as BF16)
  safetensors+fsync  save_file, then fsync of the file and of the directory (added here)
  np.save            one .npy per leaf: no fsync (an ml_dtypes bfloat16 array is written as '|V2' records;
                     np.load returns them as void and the restore views them as bfloat16, no copy)
  np.save+fdatasync  the same, fdatasync of every file and fsync of the directory
  raw floor          one file per leaf, os.pwrite + os.fdatasync from a ThreadPoolExecutor(4) (a leaf over
                     4 MiB in 4 MiB pieces, each a task, then its fdatasync), then fsync of the directory:
                     no format, no metadata, no checksums (the durable floor)
Restore methods (each returns the state tree; jax arrays where it says device_put or target=):
  cfs target=        load_checkpoint(cid, target=tree of jax.ShapeDtypeStruct with a device sharding)
  cfs numpy          load_checkpoint(cid) (numpy arrays; every chunk CRC-checked, as in all cfs loads)
  cfs numpy+put      jax.device_put(load_checkpoint(cid)["state"])
  orbax target=      StandardCheckpointer().restore(path, the same abstract tree): jax arrays
  safetensors+put    safetensors.numpy.load_file, then jax.device_put
  np.load+put        np.load of every .npy, then jax.device_put
  raw floor          preallocated numpy arrays, 64-byte aligned (so that JAX on the CPU adopts them in
                     device_put without a copy), filled by os.preadv from a ThreadPoolExecutor(4) (4 MiB
                     pieces of big leaves), then one jax.device_put of the tree (the floor for a restore
                     into JAX arrays)
Every restore ends with jax.block_until_ready; each is checked once (its warm-up run) bit for bit
against the state.  Restores read from the page cache (the files were just written), for every
method alike.  Before each timed save the file system is synced (syncfs, untimed), so that no
save pays for another's dirty pages.  Methods are interleaved: round 0 (the warm-up) runs every
method once, then every round runs every method again.

"vs orbax" and "vs floor" are speed ratios (reference median / this median; > 1: faster than the
reference): saves against "orbax" and "raw floor" saves, restores against "orbax target=" and
"raw floor" restores.  With --memory, each method runs once more in a child process of its own and
"peak MiB" is the kernel's high-water mark of that process (VmHWM, reset through
/proc/self/clear_refs once the state is built) minus its VmRSS at that moment; a restore's
child drops the state first, so its peak includes the restored state itself.
With --check-fsync, each save method runs once in a child under `strace -f -c` and the fsync,
fdatasync, sync_file_range, syncfs and msync calls it made are printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import ml_dtypes
import numpy as np

GiB, MiB = 1 << 30, 1 << 20
ALL_STATES = ("gpt2", "resnet50", "flow", "small", "1k")
MODEL_STATES = ("gpt2", "resnet50", "flow")
PEERS = ("cfs", "orbax", "safetensors", "npy", "raw")
SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "msync")

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


# ------------------------------------------------------------------ states
GPT2_SMALL = {"vocab": 50257, "n_ctx": 1024, "d_model": 768, "n_layer": 12, "n_head": 12, "d_mlp": 3072}


def _dim(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _normal(rng: np.random.Generator, shape: tuple, dtype: Any, std: float = 0.02) -> np.ndarray:
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= std
    return a.astype(dtype, copy=False)


def _positive(rng: np.random.Generator, shape: tuple, scale: float = 1e-6) -> np.ndarray:
    a = rng.random(shape, dtype=np.float32)
    a *= scale
    return a


def gpt2_shapes(scale: float = 1.0, n_layer: int | None = None) -> dict:
    """The parameter shapes of GPT-2 small (Hugging Face / Flax naming), big dimensions times ``scale``
    (``n_layer``: fewer blocks, for a smoke run)."""
    c = dict(GPT2_SMALL, n_layer=n_layer or GPT2_SMALL["n_layer"])
    d, m, v, t = (_dim(c[k], scale) for k in ("d_model", "d_mlp", "vocab", "n_ctx"))

    def ln() -> dict:
        return {"scale": (d,), "bias": (d,)}

    tree: dict = {"wte": (v, d), "wpe": (t, d)}
    for i in range(c["n_layer"]):
        tree[f"h{i:02d}"] = {
            "ln_1": ln(),
            "attn": {"c_attn": {"w": (d, 3 * d), "b": (3 * d,)}, "c_proj": {"w": (d, d), "b": (d,)}},
            "ln_2": ln(),
            "mlp": {"c_fc": {"w": (d, m), "b": (m,)}, "c_proj": {"w": (m, d), "b": (d,)}},
        }
    tree["ln_f"] = ln()
    return tree


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple)


def _map_shapes(fn: Callable[[tuple], np.ndarray], tree: dict) -> dict:
    return {k: fn(v) if _is_shape(v) else _map_shapes(fn, v) for k, v in tree.items()}


def gpt2_small(scale: float = 1.0, seed: int = 0, n_layer: int | None = None) -> dict:
    """Training state of GPT-2 small: bfloat16 params, float32 Adam mu and nu, two int32 counts."""
    rng = np.random.default_rng(seed)
    shapes = gpt2_shapes(scale, n_layer)
    return {
        "params": _map_shapes(lambda s: _normal(rng, s, ml_dtypes.bfloat16), shapes),
        "opt_state": {
            "adam": {
                "count": np.asarray(1000, np.int32),
                "mu": _map_shapes(lambda s: _normal(rng, s, np.float32, 1e-3), shapes),
                "nu": _map_shapes(lambda s: _positive(rng, s), shapes),
            },
            "schedule": {"count": np.asarray(1000, np.int32)},
        },
    }


RESNET50_BLOCKS = (3, 4, 6, 3)


def resnet50_shapes(scale: float = 1.0, blocks: tuple[int, ...] = RESNET50_BLOCKS) -> tuple[dict, dict]:
    """(params, batch_stats) shapes of ResNet-50, channel counts times ``scale`` (``blocks``: per stage)."""
    c = lambda n: _dim(n, scale)
    params: dict = {}
    stats: dict = {}

    def conv_bn(where: dict, swhere: dict, name: str, k: int, cin: int, cout: int) -> None:
        where[f"conv{name}"] = {"kernel": (k, k, cin, cout)}
        where[f"bn{name}"] = {"scale": (cout,), "bias": (cout,)}
        swhere[f"bn{name}"] = {"mean": (cout,), "var": (cout,)}

    conv_bn(params, stats, "_init", 7, 3, c(64))
    cin = c(64)
    for s, (nblocks, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        w, out = c(width), c(4 * width)
        for b in range(nblocks):
            p: dict = {}
            st: dict = {}
            conv_bn(p, st, "1", 1, cin, w)
            conv_bn(p, st, "2", 3, w, w)
            conv_bn(p, st, "3", 1, w, out)
            if b == 0:
                conv_bn(p, st, "_proj", 1, cin, out)
            params[f"stage{s + 1}_block{b}"] = p
            stats[f"stage{s + 1}_block{b}"] = st
            cin = out
    params["fc"] = {"kernel": (cin, c(1000)), "bias": (c(1000),)}
    return params, stats


def resnet50(scale: float = 1.0, seed: int = 0, blocks: tuple[int, ...] = RESNET50_BLOCKS) -> dict:
    """Training state of ResNet-50: float32 params, batch_stats, SGD momentum, count and step."""
    rng = np.random.default_rng(seed)
    pshapes, sshapes = resnet50_shapes(scale, blocks)

    def stats_of(tree: dict) -> dict:  # running means near 0, running variances near 1
        return {
            k: (_normal(rng, v, np.float32, 0.1) if k == "mean" else 1.0 + _positive(rng, v, 0.5))
            if _is_shape(v)
            else stats_of(v)
            for k, v in tree.items()
        }

    stats = stats_of(sshapes)
    return {
        "params": _map_shapes(lambda s: _normal(rng, s, np.float32), pshapes),
        "batch_stats": stats,
        "opt_state": {
            "momentum": _map_shapes(lambda s: _normal(rng, s, np.float32, 1e-3), pshapes),
            "count": np.asarray(5000, np.int32),
        },
        "step": np.asarray(5000, np.int32),
    }


def flow_state(seed: int = 0) -> dict:
    """The state the default flow (`cfs run`: deblur2d) checkpoints: {x, y, key, alpha}."""
    import jax

    from computable_flows_shim import make_example
    from computable_flows_shim.flow._examples import DEFAULT_EXAMPLE

    _, y, _ = make_example(DEFAULT_EXAMPLE, seed=seed)
    rng = np.random.default_rng(seed)
    return {
        "x": y + _normal(rng, y.shape, np.float32, 0.01),
        "y": np.asarray(y),
        # the flow checkpoints a typed jax.random.key; its raw uint32 data is what every peer can store
        "key": np.asarray(jax.random.key_data(jax.random.key(seed))),
        "alpha": np.asarray(0.37, np.float32),
    }


# no float64: without jax_enable_x64, device_put (and so every restore into JAX arrays) makes it float32
SMALL_DTYPES = (np.float32, ml_dtypes.bfloat16, np.float16, np.int32, np.int8, np.uint8)


def many_small(n: int = 10_000, seed: int = 0) -> dict:
    """``n`` leaves of 1-64 KiB of mixed dtypes, 100 to a sub-dict."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for i in range(n):
        dt = np.dtype(SMALL_DTYPES[int(rng.integers(len(SMALL_DTYPES)))])
        count = int(rng.integers(1024, 65536 + 1)) // dt.itemsize
        if dt.kind not in "iu":  # float16/32/64 and bfloat16 (kind 'V')
            a = _normal(rng, (count,), dt, 1.0)
        else:
            info = np.iinfo(dt)
            a = rng.integers(info.min, info.max, size=count, dtype=dt, endpoint=True)
        tree.setdefault(f"block{i // 100:03d}", {})[f"w{i % 100:02d}"] = a
    return tree


def many_1k(n: int = 10_000, seed: int = 0) -> dict:
    """``n`` float32 leaves of 1 KiB each, 100 to a sub-dict."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for i in range(n):
        tree.setdefault(f"block{i // 100:03d}", {})[f"w{i % 100:02d}"] = _normal(rng, (256,), np.float32, 1.0)
    return tree


def build_state(name: str, scale: float, leaves: int, shallow: bool = False) -> tuple[dict, str]:
    """A state by name; ``shallow`` (smoke runs): 1 GPT-2 block, 1 ResNet block per stage."""
    if name == "gpt2":
        state = gpt2_small(scale, n_layer=1 if shallow else None)
        return state, "GPT-2 small: params bfloat16, Adam mu/nu float32, 2 int32 counts" + (
            " (1 block: smoke)" if shallow else ""
        )
    if name == "resnet50":
        state = resnet50(scale, blocks=(1, 1, 1, 1) if shallow else RESNET50_BLOCKS)
        return state, "ResNet-50: params, batch_stats, momentum float32, count, step" + (
            " (1 block a stage: smoke)" if shallow else ""
        )
    if name == "flow":
        return flow_state(), "the default flow's state (deblur2d): x, y, key data, alpha"
    if name == "small":
        return many_small(leaves), f"{leaves} leaves of 1-64 KiB, mixed dtypes"
    if name == "1k":
        return many_1k(leaves), f"{leaves} float32 leaves of 1 KiB"
    raise SystemExit(f"unknown state {name!r}; choose from {','.join(ALL_STATES)}")


# ------------------------------------------------------------------ helpers
def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: str) -> None:
    """Flush this file system's dirty pages (untimed, before each save)."""
    if _LIBC is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array starting on a 64-byte boundary: JAX on the CPU adopts such a host
    buffer in device_put instead of copying it (numpy's large allocations are 16-byte aligned)."""
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + alignment, np.uint8)
    off = -buf.ctypes.data % alignment
    return buf[off : off + n].view(dtype).reshape(shape)


def _bytes_of(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def same(a: Any, b: np.ndarray) -> bool:
    x = np.asarray(a)
    return x.dtype == b.dtype and x.shape == b.shape and np.array_equal(_bytes_of(x), _bytes_of(b))


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


@dataclass
class State:
    name: str
    what: str
    tree: dict
    names: list[str]
    arrays: list[np.ndarray]
    treedef: Any
    abstract: Any
    nbytes: int

    @classmethod
    def make(cls, name: str, scale: float, leaves: int, shallow: bool = False) -> State:
        import jax

        tree, what = build_state(name, scale, leaves, shallow)
        pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
        names = ["/".join(str(k.key) for k in path) for path, _ in pairs]
        arrays = [a for _, a in pairs]
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), tree)
        return cls(name, what, tree, names, arrays, treedef, abstract, sum(a.nbytes for a in arrays))

    def unflatten(self, leaves: list) -> Any:
        import jax

        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def drop(self) -> None:
        """Forget the arrays (a restore child measures from a baseline without them)."""
        self.tree, self.arrays = {}, []


def _put(tree: Any) -> Any:
    import jax

    return jax.block_until_ready(jax.device_put(tree))


# ------------------------------------------------------------------ formats
_FRESH = itertools.count()


class Format:
    """One way of writing the state: save() -> handle, remove(handle), restores."""

    family = ""

    def __init__(self, st: State, work: str, pool: ThreadPoolExecutor) -> None:
        self.st, self.work, self.pool = st, work, pool
        self.n = 0

    def fresh(self, tag: str) -> str:
        """A new path in the work directory (unique across formats)."""
        return os.path.join(self.work, f"{tag}-{next(_FRESH)}")

    def save(self) -> Any:
        raise NotImplementedError

    def remove(self, handle: Any) -> None:
        if os.path.isdir(handle):
            shutil.rmtree(handle, ignore_errors=True)
        elif os.path.exists(handle):
            os.unlink(handle)

    def close(self) -> None:
        pass


class Cfs(Format):
    family = "cfs"

    pack_max_bytes: int | None = None  # --pack-max-bytes (None: the library's default)

    def __init__(self, st: State, work: str, pool: ThreadPoolExecutor, durable: bool) -> None:
        super().__init__(st, work, pool)
        from computable_flows_shim import CheckpointManager

        root = os.path.join(work, "cfs-durable" if durable else "cfs-nofsync")
        packing = {} if self.pack_max_bytes is None else {"pack_max_bytes": self.pack_max_bytes}
        self.mgr = CheckpointManager(root, durable=durable, **packing)

    def save(self) -> Any:
        self.n += 1
        return self.mgr.create_checkpoint(f"b{self.n}", 1, self.st.tree, {})

    def remove(self, handle: Any) -> None:
        self.mgr.delete_checkpoint(handle)

    def load_numpy(self, cid: Any) -> Any:
        return self.mgr.load_checkpoint(cid)["state"]

    def load_target(self, cid: Any) -> Any:
        import jax

        return jax.block_until_ready(self.mgr.load_checkpoint(cid, target=self.st.abstract)["state"])

    def load_put(self, cid: Any) -> Any:
        return _put(self.load_numpy(cid))

    def close(self) -> None:
        self.mgr.close()


class Orbax(Format):
    family = "orbax"

    def __init__(self, st: State, work: str, pool: ThreadPoolExecutor) -> None:
        super().__init__(st, work, pool)
        import orbax.checkpoint as ocp

        self.ck = ocp.StandardCheckpointer()

    def save(self) -> Any:
        p = self.fresh("orbax")
        self.ck.save(p, self.st.tree)
        self.ck.wait_until_finished()
        return p

    def load_target(self, p: Any) -> Any:
        import jax

        return jax.block_until_ready(self.ck.restore(p, self.st.abstract))

    def close(self) -> None:
        self.ck.close()


class Safetensors(Format):
    family = "safetensors"

    def __init__(self, st: State, work: str, pool: ThreadPoolExecutor, fsync: bool) -> None:
        super().__init__(st, work, pool)
        from safetensors.numpy import load_file, save_file

        self.save_file, self.load_file, self.fsync = save_file, load_file, fsync

    def save(self) -> Any:
        p = self.fresh("st") + ".safetensors"
        self.save_file(dict(zip(self.st.names, self.st.arrays)), p)
        if self.fsync:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.work)
        return p

    def load_put(self, p: Any) -> Any:
        d = self.load_file(p)
        return _put(self.st.unflatten([d[k] for k in self.st.names]))


class Npy(Format):
    family = "npy"

    def __init__(self, st: State, work: str, pool: ThreadPoolExecutor, fsync: bool) -> None:
        super().__init__(st, work, pool)
        self.fsync = fsync

    def save(self) -> Any:
        d = self.fresh("npy")
        os.makedirs(d)
        for i, a in enumerate(self.st.arrays):
            with open(os.path.join(d, f"{i}.npy"), "wb") as f:
                np.save(f, a)
                if self.fsync:
                    f.flush()
                    os.fdatasync(f.fileno())
        if self.fsync:
            fsync_dir(d)
            fsync_dir(self.work)
        return d

    def load_put(self, d: Any) -> Any:
        import jax

        out = []
        for i, want in enumerate(jax.tree_util.tree_leaves(self.st.abstract)):
            a = np.load(os.path.join(d, f"{i}.npy"))
            # np.save writes an ml_dtypes bfloat16 array as '|V2' records: view them back (no copy)
            out.append(a if a.dtype == want.dtype else a.view(want.dtype))
        return _put(self.st.unflatten(out))


RAW_PIECE = 4 << 20
"""The raw floor moves a leaf larger than this in pieces of this size, each a task of its own (cfs
chunks leaves at 4 MiB too): a 150 MB leaf is then written and read by every thread, not one."""


def _pwrite_all(fd: int, buf: memoryview, off: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], off + done)


def _pread_all(fd: int, buf: memoryview, off: int) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], off + done)
        if got <= 0:
            raise OSError("short read")
        done += got


class Raw(Format):
    """The floor: bytes only, one file per leaf, 4 threads, leaves over 4 MiB moved in 4 MiB pieces."""

    family = "raw"

    def save(self) -> Any:
        d = self.fresh("raw")
        os.makedirs(d)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        bufs = [_bytes_of(a).data for a in self.st.arrays]
        big = {i: os.open(os.path.join(d, str(i)), flags, 0o644) for i, b in enumerate(bufs) if len(b) > RAW_PIECE}

        def small(i: int) -> None:  # a whole leaf: open, write, fdatasync, close
            fd = os.open(os.path.join(d, str(i)), flags, 0o644)
            try:
                _pwrite_all(fd, bufs[i], 0)
                os.fdatasync(fd)
            finally:
                os.close(fd)

        def piece(i: int, off: int) -> None:
            _pwrite_all(big[i], bufs[i][off : off + RAW_PIECE], off)

        tasks = [partial(small, i) for i in range(len(bufs)) if i not in big]
        tasks += [partial(piece, i, off) for i in big for off in range(0, len(bufs[i]), RAW_PIECE)]
        try:
            list(self.pool.map(lambda t: t(), tasks))
            list(self.pool.map(os.fdatasync, big.values()))
        finally:
            for fd in big.values():
                os.close(fd)
        fsync_dir(d)
        fsync_dir(self.work)
        return d

    def load_put(self, d: Any) -> Any:
        import jax

        leaves = jax.tree_util.tree_leaves(self.st.abstract)
        outs = [aligned_empty(x.shape, np.dtype(x.dtype)) for x in leaves]
        bufs = [a.reshape(-1).view(np.uint8).data for a in outs]
        big = {i: os.open(os.path.join(d, str(i)), os.O_RDONLY) for i, b in enumerate(bufs) if len(b) > RAW_PIECE}

        def small(i: int) -> None:
            fd = os.open(os.path.join(d, str(i)), os.O_RDONLY)
            try:
                _pread_all(fd, bufs[i], 0)
            finally:
                os.close(fd)

        def piece(i: int, off: int) -> None:
            _pread_all(big[i], bufs[i][off : off + RAW_PIECE], off)

        tasks = [partial(small, i) for i in range(len(bufs)) if i not in big]
        tasks += [partial(piece, i, off) for i in big for off in range(0, len(bufs[i]), RAW_PIECE)]
        try:
            list(self.pool.map(lambda t: t(), tasks))
        finally:
            for fd in big.values():
                os.close(fd)
        return _put(self.st.unflatten(outs))


# ------------------------------------------------------------------ rows
@dataclass
class Row:
    key: str  # "save:cfs" ...: the child's argument
    kind: str  # "save" | "restore"
    label: str
    family: str
    note: str  # what it does about fsync (saves) or how it reads (restores)
    fmt_key: str = ""  # the format written or read (a save row and its restore rows share one)
    restore: Callable[[Format, Any], Any] | None = None
    skip: str | None = None
    times: list[float] = field(default_factory=list)
    peak: int | None = None
    peak_how: str = ""
    syncs: dict[str, int] | None = None


def _missing(module: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec(module) is not None else "skipped (not installed)"


def make_rows(st: State, work: str, pool: ThreadPoolExecutor) -> tuple[list[Row], dict[str, Callable[[], Format]]]:
    no_orbax = _missing("orbax.checkpoint")
    no_st = _missing("safetensors")
    fmts: dict[str, Callable[[], Format]] = {
        "cfs": lambda: Cfs(st, work, pool, durable=True),
        "cfs-nofsync": lambda: Cfs(st, work, pool, durable=False),
        "orbax": lambda: Orbax(st, work, pool),
        "st": lambda: Safetensors(st, work, pool, fsync=False),
        "st-fsync": lambda: Safetensors(st, work, pool, fsync=True),
        "npy": lambda: Npy(st, work, pool, fsync=False),
        "npy-fsync": lambda: Npy(st, work, pool, fsync=True),
        "raw": lambda: Raw(st, work, pool),
    }
    S = lambda key, label, fam, note, skip=None: Row(f"save:{key}", "save", label, fam, note, fmt_key=key, skip=skip)
    R = lambda key, label, fam, fk, note, fn, skip=None: Row(
        f"restore:{key}", "restore", label, fam, note, fmt_key=fk, restore=fn, skip=skip
    )
    rows = [
        S("cfs", "cfs durable", "cfs", "one syncfs, dir fsync"),
        S("cfs-nofsync", "cfs no fsync", "cfs", "none"),
        S("orbax", "orbax", "orbax", "fsync (tensorstore)", no_orbax),
        S("st", "safetensors", "safetensors", "none", no_st),
        S("st-fsync", "safetensors+fsync", "safetensors", "fsync file+dir", no_st),
        S("npy", "np.save", "npy", "none"),
        S("npy-fsync", "np.save+fdatasync", "npy", "fdatasync files+dir"),
        S("raw", "raw floor", "raw", "fdatasync files+dir"),
        R("cfs-target", "cfs target=", "cfs", "cfs", "CRC-checked, jax", lambda f, h: f.load_target(h)),
        R("cfs-np", "cfs numpy", "cfs", "cfs", "CRC-checked, numpy", lambda f, h: f.load_numpy(h)),
        R("cfs-put", "cfs numpy+put", "cfs", "cfs", "CRC-checked, jax", lambda f, h: f.load_put(h)),
        R("orbax", "orbax target=", "orbax", "orbax", "jax", lambda f, h: f.load_target(h), no_orbax),
        R("st", "safetensors+put", "safetensors", "st", "mmap, jax", lambda f, h: f.load_put(h), no_st),
        R("npy", "np.load+put", "npy", "npy", "jax", lambda f, h: f.load_put(h)),
        R("raw", "raw floor", "raw", "raw", "4 threads, jax", lambda f, h: f.load_put(h)),
    ]
    return rows, fmts


# ------------------------------------------------------------------ timing
def run_state(st: State, args: argparse.Namespace, work: str, pool: ThreadPoolExecutor) -> list[Row]:
    rows, fmt_makers = make_rows(st, work, pool)
    active = [r for r in rows if r.skip is None and r.family in args.peers]
    for r in rows:
        if r.skip is None and r.family not in args.peers:
            r.skip = "skipped (--peers)"
    fmts: dict[str, Format] = {}
    for r in active:
        if r.fmt_key not in fmts:
            fmts[r.fmt_key] = fmt_makers[r.fmt_key]()
    last: dict[str, Any] = {}
    saves = [r for r in active if r.kind == "save"]
    restores = [r for r in active if r.kind == "restore"]
    rounds = args.warmup + args.repeats
    try:
        for rnd in range(rounds):
            for r in saves:
                f = fmts[r.fmt_key]
                if r.fmt_key in last:
                    f.remove(last.pop(r.fmt_key))
                gc.collect()
                syncfs(work)
                t = time.perf_counter()
                last[r.fmt_key] = f.save()
                dt = time.perf_counter() - t
                if rnd >= args.warmup:
                    r.times.append(dt)
        # a restore reads the last save of its format; a format no save row wrote (filtered out) is written now
        for r in restores:
            if r.fmt_key not in last:
                last[r.fmt_key] = fmts[r.fmt_key].save()
        for k in list(last):
            if not any(r.fmt_key == k for r in restores):
                fmts[k].remove(last.pop(k))
        for rnd in range(rounds):
            for r in restores:
                assert r.restore is not None
                out = None
                gc.collect()
                t = time.perf_counter()
                out = r.restore(fmts[r.fmt_key], last[r.fmt_key])
                dt = time.perf_counter() - t
                if rnd == 0:
                    check(st, r, out)
                if rnd >= args.warmup:
                    r.times.append(dt)
                del out
    finally:
        for k, h in last.items():
            fmts[k].remove(h)
        for f in fmts.values():
            f.close()
    return rows


def check(st: State, r: Row, out: Any) -> None:
    import jax

    leaves = jax.tree_util.tree_leaves(out)
    want_jax = r.label not in ("cfs numpy",)
    bad = [n for n, a, b in zip(st.names, leaves, st.arrays) if not same(a, b)]
    if len(leaves) != len(st.arrays) or bad:
        raise SystemExit(f"{r.label}: restored state differs from the saved one (leaves {bad[:3]})")
    if want_jax and not all(isinstance(a, jax.Array) for a in leaves):
        raise SystemExit(f"{r.label}: expected jax arrays")


# ------------------------------------------------------------------ child processes
def child_main(args: argparse.Namespace) -> None:
    """Run one method once, print {"peak": bytes above the baseline} as the last line."""
    import jax

    st = State.make(args.states[0], args.scale, args.leaves, args.shallow)
    pool = ThreadPoolExecutor(4)
    rows, fmt_makers = make_rows(st, args.dir, pool)
    (r,) = [r for r in rows if r.key == args.child]
    if r.skip:
        raise SystemExit(r.skip)
    fmt = fmt_makers[r.fmt_key]()
    jax.block_until_ready(jax.device_put(np.zeros(4)))  # the backend is up before the baseline
    handle = None
    if r.kind == "restore":
        handle = fmt.save()
        if args.memory:
            st.drop()
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        how = "VmHWM"
    except OSError:
        how = "ru_maxrss"
    base = proc_status()["VmRSS"]
    if r.kind == "save":
        handle = fmt.save()
    else:
        assert r.restore is not None
        out = r.restore(fmt, handle)
        jax.block_until_ready(out)
    if how == "VmHWM":
        peak = proc_status()["VmHWM"]
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak - base, "how": how}))
    sys.stdout.flush()
    if not args.syncs_only:  # under strace, the save alone is counted: the parent removes the directory
        fmt.remove(handle)
    fmt.close()
    os._exit(0)  # skip the interpreter's teardown (orbax's threads)


def child_cmd(args: argparse.Namespace, state: str, key: str, work: str) -> list[str]:
    return [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        key,
        "--states",
        state,
        "--scale",
        repr(args.scale),
        "--leaves",
        str(args.leaves),
        *(["--pack-max-bytes", str(args.pack_max_bytes)] if args.pack_max_bytes is not None else []),
        "--dir",
        work,
    ] + (["--shallow"] if args.shallow else [])


def run_children(st: State, rows: list[Row], args: argparse.Namespace, base: str) -> None:
    for r in rows:
        if r.skip is not None:
            continue
        if args.memory:
            work = tempfile.mkdtemp(dir=base)
            try:
                p = subprocess.run(
                    child_cmd(args, st.name, r.key, work) + ["--memory"], capture_output=True, text=True, timeout=1800
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if p.returncode != 0:
                raise SystemExit(f"memory child {r.key} failed:\n{p.stderr[-3000:]}")
            got = json.loads(p.stdout.strip().splitlines()[-1])
            r.peak, r.peak_how = int(got["peak"]), got["how"]
        if args.check_fsync and r.kind == "save":
            work = tempfile.mkdtemp(dir=base)
            trace = os.path.join(work, "strace.txt")
            strace = [*_strace(), "-c", "-e", "trace=" + ",".join(SYNC_CALLS), "-o", trace]
            try:
                p = subprocess.run(
                    strace + child_cmd(args, st.name, r.key, work) + ["--syncs-only"],
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
                if p.returncode != 0:
                    raise SystemExit(f"strace child {r.key} failed:\n{p.stderr[-3000:]}")
                r.syncs = parse_strace(open(trace).read())
            finally:
                shutil.rmtree(work, ignore_errors=True)


def _strace() -> list[str]:
    """strace following threads and children; stopping only at the traced calls where it can (seccomp-bpf)."""
    cmd = ["strace", "-f", "-qq"]
    fast = subprocess.run([*cmd, "--seccomp-bpf", "-e", "trace=fsync", "-o", os.devnull, "true"], capture_output=True)
    return [*cmd, "--seccomp-bpf"] if fast.returncode == 0 else cmd


def parse_strace(text: str) -> dict[str, int]:
    """Calls per syscall from `strace -c` output."""
    counts = dict.fromkeys(SYNC_CALLS, 0)
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 5 and f[-1] in counts and f[3].isdigit():
            counts[f[-1]] = int(f[3])
    return counts


# ------------------------------------------------------------------ report
def _fmt_ratio(ref: float | None, t: float | None) -> str:
    return f"{ref / t:.2f}x" if ref and t else "-"


def report(st: State, rows: list[Row], args: argparse.Namespace) -> None:
    sizes = [a.nbytes for a in st.arrays]
    print(
        f"\n== {st.name}: {st.what}\n"
        f"   {len(st.arrays)} leaves, {st.nbytes:,} bytes ({st.nbytes / GiB:.3f} GiB); "
        f"leaf sizes {min(sizes):,} B to {max(sizes):,} B, median {int(statistics.median(sizes)):,} B"
    )
    print(
        f"   median of {args.repeats} run(s) after {args.warmup} warm-up round(s); {os.cpu_count()} CPUs; "
        f"python {sys.version.split()[0]}, numpy {np.__version__}"
    )
    med = {r.key: statistics.median(r.times) for r in rows if r.times}
    refs = {
        "save": (med.get("save:orbax"), med.get("save:raw")),
        "restore": (med.get("restore:orbax"), med.get("restore:raw")),
    }
    mem = args.memory
    print(
        f"{'':8}{'method':<19} {'fsync / reads':<28} {'median s':>9} {'GiB/s':>7} {'vs orbax':>8} {'vs floor':>8}"
        + (f" {'peak MiB':>8}" if mem else "")
        + "   all runs (s)"
    )
    for r in rows:
        head = f"{r.kind:<8}{r.label:<19} {r.note:<28}"
        if not r.times:
            print(f"{head} {r.skip or 'no runs'}")
            continue
        m = med[r.key]
        o, fl = refs[r.kind]
        peak = f" {r.peak / MiB:8.0f}" if mem and r.peak is not None else (f" {'-':>8}" if mem else "")
        print(
            f"{head} {m:9.4f} {st.nbytes / GiB / m:7.3f} {_fmt_ratio(o, m):>8} {_fmt_ratio(fl, m):>8}{peak}   "
            + " ".join(f"{t:.4f}" for t in r.times)
        )
    if mem:
        print(
            "   peak MiB: kernel-measured, VmHWM of a child process running the method once (reset through "
            "/proc/self/clear_refs after building the state) minus its VmRSS then; restores include the state"
        )
        if any(r.peak_how == "ru_maxrss" for r in rows):
            print("   (/proc/self/clear_refs refused: ru_maxrss instead, which includes building the state)")
    if args.check_fsync:
        print(
            f"   sync calls made by each save of these {len(st.arrays)} leaves "
            "(strace -f -c of a child process running it once):"
        )
        for r in rows:
            if r.syncs is not None:
                calls = ", ".join(f"{k} {v}" for k, v in r.syncs.items() if v) or "none"
                print(f"     {r.label:<19} {calls}")

    def ratio(ref: str, k: str) -> float | None:
        return med[ref] / med[k] if ref in med and k in med else None

    def line(name: str, v: float | None, goal: float | None, unit: str = "x") -> None:
        if v is None:
            print(f"   {name:<52} n/a")
            return
        val = f"{v:.2f}{unit}" if unit == "x" else f"{v:.3f}{unit}"
        verdict = ""
        if goal is not None:
            ok = v >= goal if unit == "x" else v <= goal
            verdict = f"  (target {'>=' if unit == 'x' else '<='} {goal:g}{unit}: {'ok' if ok else 'MISSED'})"
        print(f"   {name:<52} {val}{verdict}")

    # the targets are for the full-size states: a scaled-down run prints its ratios without a verdict
    full = args.scale == 1.0 and not args.shallow
    model = st.name in MODEL_STATES and full
    print("   cfs against the others (speed ratios, higher is better for cfs):")
    line("durable save vs orbax (both durable)", ratio("save:orbax", "save:cfs"), 2.5 if model else None)
    line("durable save vs raw floor (both durable)", ratio("save:raw", "save:cfs"), 0.8 if model else None)
    line("no-fsync save vs np.save", ratio("save:npy", "save:cfs-nofsync"), None)
    line("no-fsync save vs safetensors", ratio("save:st", "save:cfs-nofsync"), None)
    line("restore target= vs orbax target=", ratio("restore:orbax", "restore:cfs-target"), 3 if model else None)
    line("restore target= vs raw floor", ratio("restore:raw", "restore:cfs-target"), 0.8 if model else None)
    line("restore target= vs cfs numpy+device_put", ratio("restore:cfs-put", "restore:cfs-target"), 1.0)
    line("restore target= vs safetensors+device_put", ratio("restore:st", "restore:cfs-target"), None)
    line("restore target= vs np.load+device_put", ratio("restore:npy", "restore:cfs-target"), None)
    if st.name == "1k":
        n = len(st.arrays)
        print(f"   fixed cost ({n:,} leaves of 1 KiB; the targets are for 10,000):")
        fixed = n == 10_000
        line("durable save, seconds", med.get("save:cfs"), 1.0 if fixed else None, " s")
        line("load (numpy), seconds", med.get("restore:cfs-np"), 0.5 if fixed else None, " s")
        line("load (target=), seconds", med.get("restore:cfs-target"), 0.5 if fixed else None, " s")


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--states", default=",".join(ALL_STATES), help=f"comma list of {','.join(ALL_STATES)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the big dimensions of gpt2/resnet50 by this")
    ap.add_argument("--leaves", type=int, default=10_000, help="leaves of the small and 1k states")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {','.join(PEERS)}")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory under ./bench-out)")
    ap.add_argument(
        "--pack-max-bytes",
        type=int,
        default=None,
        help="CheckpointManager(pack_max_bytes=...) of the cfs rows (default: the library's, 64 KiB; 0: no packing)",
    )
    ap.add_argument("--memory", action="store_true", help="peak memory of each method, in a child process")
    ap.add_argument("--check-fsync", action="store_true", help="count the sync calls of each save under strace")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 1 run, no warm-up (CI)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--syncs-only", action="store_true", help=argparse.SUPPRESS)  # child under strace: no removal
    ap.add_argument("--shallow", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    Cfs.pack_max_bytes = args.pack_max_bytes
    if args.smoke:
        args.scale, args.leaves, args.repeats, args.warmup = min(args.scale, 0.01), min(args.leaves, 50), 1, 0
        args.shallow = True
    args.states = [s for s in args.states.split(",") if s]
    args.peers = [p for p in args.peers.split(",") if p]
    for s in args.states:
        if s not in ALL_STATES:
            ap.error(f"unknown state {s!r}; choose from {','.join(ALL_STATES)}")
    for p in args.peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}; choose from {','.join(PEERS)}")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("need --repeats >= 1 and --warmup >= 0")
    if args.check_fsync and shutil.which("strace") is None:
        ap.error("--check-fsync needs strace")

    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger("absl").setLevel(logging.ERROR)
    if args.child:
        child_main(args)
        return

    base = args.dir or os.path.join(os.getcwd(), "bench-out")
    os.makedirs(base, exist_ok=True)
    pool = ThreadPoolExecutor(4, thread_name_prefix="raw")
    for name in args.states:
        st = State.make(name, args.scale, args.leaves, args.shallow)
        work = tempfile.mkdtemp(dir=base)
        try:
            rows = run_state(st, args, work, pool)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if args.memory or args.check_fsync:
            run_children(st, rows, args, base)
        report(st, rows, args)
        sys.stdout.flush()
        del st, rows
        gc.collect()
    pool.shutdown()
    with contextlib.suppress(OSError):
        if not args.dir:
            os.rmdir(base)  # only if empty


if __name__ == "__main__":
    main()
