"""A fork server for crash and fault-injection tests, and the I/O tracer it installs.

The server (``python _harness.py``) imports the library once, then for each command
forks a child that performs one real save.  In the child an :class:`IOTracer` wraps the
file-system calls a save makes (``os.open``, ``os.write``, ``os.writev``, ``os.fsync``,
``os.fdatasync``, ``os.rename``, ``os.replace``, ``os.mkdir``, ``os.link`` and the
``renameat2(2)`` the store calls through ctypes), numbers them, and at call N either

- SIGKILLs its own process right before or right after the call (a real kill: no
  exception, no ``finally``, no flush), or
- fails the call with an ``OSError`` (once, or the Nth and every later call), or makes a
  write write fewer bytes than asked (short write) or none.

The library code runs unmodified: the wrappers sit at the os-call boundary, like SQLite's
test VFS.  Nothing in the library is patched except the module global holding the
ctypes ``renameat2`` function, which is wrapped the same way.

Protocol: one JSON object per line on stdin (a command) and stdout (its result).  The
server never runs library code itself (its I/O thread pool must not exist before a
fork); the child does everything and reports over a pipe.

States are deterministic functions of (shape, iteration), so the test process can check
any checkpoint bit for bit: :func:`make_save_args` is importable without side effects.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import ml_dtypes
import numpy as np

SHAPES = ("leaf", "tree", "incremental")
Point = collections.namedtuple("Point", "x y")


def make_save_args(shape: str, iteration: int) -> dict:
    """Keyword arguments of ``create_checkpoint`` (minus run id and iteration) for a shape.

    - ``leaf``: the whole state is one float64 array (one chunk), no telemetry;
    - ``tree``: nested dicts, lists, tuples and a namedtuple of small leaves of many dtypes,
      Python scalars and None, a flow config, and a telemetry history of 70,000 samples
      (two chunks per column, a text column) with events;
    - ``incremental``: a 4.5 MiB leaf identical in every checkpoint of the run (its chunks are
      hard-linked from the previous checkpoint), a small changing leaf, and a history
      whose first chunk never changes (linked too).
    """
    rng = np.random.default_rng(iteration)
    if shape == "leaf":
        return {"state": rng.standard_normal(150_000), "flow_config": {"it": iteration}}
    if shape == "tree":
        n = 70_000
        state = {
            "params": {
                "w": rng.standard_normal((64, 33)).astype(np.float32),
                "b": rng.standard_normal(33).astype(ml_dtypes.bfloat16),
                "q": rng.integers(-8, 8, size=(5, 7)).astype(ml_dtypes.int4),
            },
            "opt": [
                np.int64(iteration),
                (rng.random(4) > 0.5, None, 0.5 + iteration),
                Point(np.complex64(1j * iteration), rng.integers(0, 255, size=(3, 2), dtype=np.uint8)),
            ],
            "empty": np.zeros((0, 3), np.float32),
            "name": f"run at {iteration}",
            "mask": rng.random((2, 2, 2)) > 0.3,
        }
        hist = {
            "iter": np.arange(n, dtype=np.int64) + iteration,
            "E": rng.standard_normal(n),
            "phase": ["GREEN", "AMBER"] * (n // 2),
            "events": [{"type": "CHECKPOINT_CREATED", "iter": iteration, "payload": {"k": [1, 2.5, None]}}],
        }
        return {
            "state": state,
            "flow_config": {"op": "blur", "levels": [1, 2, 3], "iteration": iteration},
            "telemetry_history": hist,
            "certificates": {"gamma": 0.25},
        }
    if shape == "incremental":
        frozen = np.random.default_rng(7).standard_normal(590_000)  # 4.5 MiB: two chunks, never changes
        n = 70_000
        e = np.random.default_rng(8).standard_normal(n)
        e[65_536:] = rng.standard_normal(n - 65_536)  # first telemetry chunk constant, second changes
        return {
            "state": {"frozen": frozen, "moving": rng.standard_normal(1000)},
            "telemetry_history": {"iter": np.arange(n), "E": e},
        }
    raise ValueError(shape)


# --------------------------------------------------------------------------- tracer

WRAPPED = ("open", "write", "writev", "fsync", "fdatasync", "rename", "replace", "mkdir", "link")
WRITES = ("write", "writev")
FSYNCS = ("fsync", "fdatasync", "syncfs")


class _Killed(Exception):
    pass


class IOTracer:
    """Wraps the os calls a save makes; see the module docstring.

    ``plan`` keys: ``action`` (``count``, ``kill``, ``fault``), ``n`` (1-based call number),
    ``when`` (``before``/``after``, kill), ``fault`` (an errno name, ``short`` or ``zero``),
    ``persistent`` (bool), ``trace`` (record every call).
    """

    def __init__(self, plan: dict, report_fd: int) -> None:
        self.plan = plan
        self.report_fd = report_fd
        self.lock = threading.Lock()
        self.n = 0
        self.fd_paths: dict[int, str] = {}
        self.events: list[dict] = []
        self.injected: list[dict] = []
        self.failed_fsync: dict[tuple[int, int], dict] = {}
        self.fsync_retries: list[dict] = []
        self.renamed = False
        self.real: dict[str, Any] = {}
        self.active = False

    # -- bookkeeping
    def _path_of(self, name: str, args: tuple) -> str:
        if name in ("open", "mkdir"):
            return os.fsdecode(args[0])
        if name == "renameat2":  # (olddirfd, old, newdirfd, new, flags)
            return f"{os.fsdecode(args[1])} -> {os.fsdecode(args[3])}"
        if name in ("rename", "replace", "link"):
            return f"{os.fsdecode(args[0])} -> {os.fsdecode(args[1])}"
        return self.fd_paths.get(args[0], f"fd {args[0]}")

    def _ident(self, fd: int) -> tuple[int, int] | None:
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def report(self, kind: str, payload: dict) -> None:
        os.write(self.report_fd, (json.dumps({"kind": kind, **payload}) + "\n").encode())

    # -- the decision for one call
    def _decide(self, name: str) -> tuple[int, str | None]:
        with self.lock:
            if not self.active:
                return 0, None
            self.n += 1
            n = self.n
            p = self.plan
            act = p.get("action")
            if act == "kill" and n == p["n"]:
                return n, "kill-" + p["when"]
            if act == "fault" and (n == p["n"] or (p.get("persistent") and n > p["n"])):
                fault = p["fault"]
                if fault in ("short", "zero"):
                    return n, fault if name in WRITES else None
                return n, "error"
            return n, None

    def call(self, name: str, real, *args, **kwargs):
        n, action = self._decide(name)
        if n == 0:
            return real(*args, **kwargs)
        path = self._path_of(name, args)
        ev: dict = {"n": n, "op": name, "path": path, "thread": threading.get_ident()}
        if name == "open":
            ev["flags"] = args[1]
        ident = None
        if name in FSYNCS:
            ident = self._ident(args[0])
            ev["ino"] = ident[1] if ident else None
            if ident is not None and ident in self.failed_fsync:
                self.fsync_retries.append({"n": n, "path": path, "first_failure": self.failed_fsync[ident]})
        if self.plan.get("trace"):
            with self.lock:
                self.events.append(ev)
        if action == "kill-before":
            self.report("killed", {"n": n, "op": name, "path": path, "when": "before", "renamed": self.renamed})
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)  # never reached
        if action == "error":
            err = getattr(errno, self.plan["fault"])
            self.injected.append({"n": n, "op": name, "path": path, "errno": err})
            if ident is not None:
                self.failed_fsync[ident] = {"n": n, "path": path}
            if name in ("renameat2", "syncfs"):  # ctypes functions: -1 and errno
                import ctypes

                ctypes.set_errno(err)
                return -1
            raise OSError(err, os.strerror(err), path)
        if action in ("short", "zero"):
            self.injected.append({"n": n, "op": name, "path": path, "fault": action})
            if action == "zero":
                return 0
            if name == "write":
                data = memoryview(args[1]).cast("B")
                return real(args[0], data[: max(1, len(data) // 2)])
            bufs = [memoryview(b).cast("B") for b in args[1]]
            want = max(1, sum(len(b) for b in bufs) // 2)
            out = []
            for b in bufs:
                if want <= 0:
                    break
                out.append(b[:want])
                want -= len(b[:want])
            return real(args[0], out)
        try:
            result = real(*args, **kwargs)
        except BaseException:
            if action == "kill-after":  # a call that failed on its own is a kill point too
                self.report("killed", {"n": n, "op": name, "path": path, "when": "after", "renamed": self.renamed})
                os.kill(os.getpid(), signal.SIGKILL)
            raise
        if name == "open":
            self.fd_paths[result] = path
        if name in ("rename", "replace") or (name == "renameat2" and result == 0):
            self.renamed = True
        if action == "kill-after":
            self.report("killed", {"n": n, "op": name, "path": path, "when": "after", "renamed": self.renamed})
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(10)
        return result

    def install(self) -> None:
        from computable_flows_shim import _platform

        for name in WRAPPED:
            real = getattr(os, name)
            self.real[name] = real
            setattr(os, name, self._wrapper(name, real))
        if _platform._renameat2 is not None:
            real_r = _platform._renameat2
            self.real["renameat2"] = real_r
            _platform._renameat2 = self._wrapper("renameat2", real_r)
        if _platform._syncfs is not None:
            self.real["syncfs"] = _platform._syncfs
            _platform._syncfs = self._wrapper("syncfs", _platform._syncfs)
        self.active = True

    def _wrapper(self, name: str, real):
        def wrapped(*args, **kwargs):
            return self.call(name, real, *args, **kwargs)

        wrapped.__name__ = name
        return wrapped

    def stop(self) -> None:
        with self.lock:
            self.active = False


# --------------------------------------------------------------------------- the child


def _error_info(e: BaseException) -> dict:
    cause = e.__cause__
    return {
        "type": type(e).__name__,
        "mro": [c.__name__ for c in type(e).__mro__],
        "message": str(e),
        "cause_errno": getattr(cause, "errno", None),
        "traceback": "".join(traceback.format_exception(e))[-3000:],
    }


def _child(cmd: dict, report_fd: int) -> None:
    from computable_flows_shim import CheckpointManager

    store = cmd["store"]
    mgr = CheckpointManager(store, durable=cmd.get("durable", True))
    plan = cmd.get("plan") or {}
    op = cmd.get("op", "save")
    if op == "loop":
        _loop(mgr, cmd, report_fd)
        return
    args = make_save_args(cmd["shape"], cmd["iteration"]) if op == "save" else {}
    if cmd.get("no_syncfs"):  # the per-file syncs of a platform without syncfs
        from computable_flows_shim._format import writer

        writer.HAVE_SYNCFS = False
    tracer = IOTracer(plan, report_fd)
    tracer.install()
    result: dict = {}
    t0 = time.perf_counter()
    try:
        if op == "save":
            result["checkpoint_id"] = mgr.create_checkpoint(
                cmd["run"], cmd["iteration"], blocking=cmd.get("blocking", True), **args
            )
            mgr.wait_until_finished()
        elif op == "rollback":
            result["checkpoint_id"] = mgr.rollback_to_checkpoint(cmd["src"], cmd["run"], cmd.get("iteration"))
        elif op == "delete":
            result["deleted"] = mgr.delete_checkpoint(cmd["src"])
        else:
            raise ValueError(op)
        result["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 - reported to the test, which decides
        result["status"] = "error"
        result["error"] = _error_info(e)
    tracer.stop()
    result["seconds"] = time.perf_counter() - t0
    result["calls"] = tracer.n
    result["injected"] = tracer.injected
    result["fsync_retries"] = tracer.fsync_retries
    result["renamed"] = tracer.renamed
    staging = os.path.join(store, ".cfs-staging")
    result["staging_left"] = sorted(os.listdir(staging)) if os.path.isdir(staging) else []
    if plan.get("trace"):
        result["events"] = tracer.events
    tracer.report("result", result)


def _loop(mgr, cmd: dict, report_fd: int) -> None:
    """Save checkpoints one after another (shapes in turn) until killed from outside."""
    it = cmd["iteration"]
    shapes = cmd["shapes"]
    while True:
        shape = shapes[it % len(shapes)]
        mgr.create_checkpoint(f"{cmd['run']}-{shape}", it, **make_save_args(shape, it))
        os.write(report_fd, (json.dumps({"kind": "saved", "iteration": it, "shape": shape}) + "\n").encode())
        it += 1


def _read_all(fd: int) -> list[dict]:
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(fd)
    return [json.loads(line) for line in b"".join(chunks).decode().splitlines() if line.strip()]


def run_command(cmd: dict) -> dict:
    """Fork a child for ``cmd``; returns how it ended and what it reported."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            _child(cmd, w)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 3
        os._exit(code)
    os.close(w)
    if cmd.get("op") == "loop":
        time.sleep(cmd["kill_after"])
        os.kill(pid, signal.SIGKILL)
    messages = _read_all(r)
    _, status = os.waitpid(pid, 0)
    out: dict = {
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
    }
    for m in messages:
        kind = m.pop("kind")
        if kind == "saved":
            out.setdefault("saved", []).append(m)
        else:
            out[kind] = m
    return out


def serve() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but the protocol on the real stdout
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        res = run_command(cmd)
        out.write(json.dumps(res) + "\n")
        out.flush()


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import computable_flows_shim  # noqa: F401 - imported once, before any fork

    serve()
