"""Power-loss crash states, the way ALICE (Pillai et al., OSDI 2014) and LazyFS build them.

A SIGKILL leaves the page cache intact; a power cut does not.  What survives a power cut is
what was made durable (``fsync``/``fdatasync`` of a file for its data, of a directory for its
entries), plus any part of the rest, in any order.  So:

1. :class:`Recorder` wraps the file-system calls of the process (``os.open``, ``write``,
   ``writev``, ``fsync``, ``fdatasync``, ``mkdir``, ``link``, ``rename``, ``replace``,
   ``unlink``, ``rmdir`` and the ``renameat2`` and ``syncfs`` the library calls through ctypes;
   ``syncfs`` makes every file and entry on the file system durable) while the library
   runs unmodified, and logs every change under the store directory as a logical operation on
   a model of the tree (inodes, directory entries, file bytes), starting from a snapshot.
2. :func:`crash_states` replays the log and, after every operation, yields the trees a POSIX
   file system may leave if the power went out right then:

   - a file's bytes not fsynced since they were written are lost (the last synced bytes), kept,
     truncated at any length, or zero-filled;
   - a directory entry created or removed (file creation, ``mkdir``, ``link``, ``unlink``,
     ``rmdir``) and not followed by an fsync of its directory is lost or kept, each on its own
     and in any order;
   - a rename is lost or kept as a whole (a journaling file system logs it as one operation),
     and is durable once either directory it touches was fsynced after it.

   Where the combinations are few (at most ``exhaustive``) every one is built; otherwise the
   state where everything un-synced is lost, the one where everything is kept (what SIGKILL
   shows) and ``samples`` random ones.  Duplicate trees are built once.
3. :func:`materialize` writes one state as a real directory tree (hard links kept), which the
   test then opens with the library.

File locks do not survive a power cut and are not modelled.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

AT_FDCWD = -100


@dataclass
class Node:
    kind: str  # "f" or "d"
    data: bytearray = field(default_factory=bytearray)  # file: bytes now
    synced: bytes = b""  # file: bytes as of the last fsync
    entries: dict[str, int] = field(default_factory=dict)  # directory: name -> node now
    synced_entries: dict[str, int] = field(default_factory=dict)  # directory: as of the last fsync
    pending: list[int] = field(default_factory=list)  # directory: entry ops since that fsync


@dataclass
class DirOp:
    """A change of directory entries: ``effects`` are ``(dir node, name, node or None)``."""

    effects: list[tuple[int, str, int | None]]
    durable: bool = False


class Model:
    """The tree under the store directory (node 0), with what of it is durable."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {0: Node("d")}
        self.ops: list[DirOp] = []

    # -- building from a real tree (all of it durable: it predates the recording)
    @classmethod
    def snapshot(cls, root: str) -> Model:
        m = cls()
        seen: dict[tuple[int, int], int] = {}

        def walk(path: str, nid: int) -> None:
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                st = entry.stat(follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    child = seen[key]
                elif entry.is_dir(follow_symlinks=False):
                    child = seen[key] = m._new("d")
                    walk(entry.path, child)
                else:
                    child = seen[key] = m._new("f")
                    with open(entry.path, "rb") as f:
                        m.nodes[child].data = bytearray(f.read())
                    m.nodes[child].synced = bytes(m.nodes[child].data)
                m.nodes[nid].entries[entry.name] = child
            m.nodes[nid].synced_entries = dict(m.nodes[nid].entries)

        walk(root, 0)
        return m

    def copy(self) -> Model:
        m = Model()
        m.nodes = {
            k: Node(n.kind, bytearray(n.data), n.synced, dict(n.entries), dict(n.synced_entries), list(n.pending))
            for k, n in self.nodes.items()
        }
        m.ops = [DirOp(list(o.effects), o.durable) for o in self.ops]
        return m

    def _new(self, kind: str) -> int:
        nid = len(self.nodes)
        self.nodes[nid] = Node(kind)
        return nid

    def resolve(self, rel: str) -> int | None:
        nid: int | None = 0
        for part in [p for p in rel.split("/") if p and p != "."]:
            if nid is None or self.nodes[nid].kind != "d":
                return None
            nid = self.nodes[nid].entries.get(part)
        return nid

    # -- operations (the log's vocabulary)
    def apply(self, ev: tuple) -> None:
        op = ev[0]
        if op == "create":  # ("create", parent, name, kind, new node id)
            _, parent, name, kind, nid = ev
            assert nid == len(self.nodes), (nid, len(self.nodes))
            self._new(kind)
            self._dir_op([(parent, name, nid)])
        elif op == "write":  # ("write", node, offset, bytes)
            _, nid, off, data = ev
            buf = self.nodes[nid].data
            if len(buf) < off:
                buf.extend(bytes(off - len(buf)))
            buf[off : off + len(data)] = data
        elif op == "fsync":  # ("fsync", node)
            node = self.nodes[ev[1]]
            if node.kind == "f":
                node.synced = bytes(node.data)
            else:
                node.synced_entries = dict(node.entries)
                for i in node.pending:
                    self.ops[i].durable = True
                node.pending = []
        elif op == "syncfs":  # ("syncfs",): everything on the file system, files and directories
            for node in self.nodes.values():
                if node.kind == "f":
                    node.synced = bytes(node.data)
                else:
                    node.synced_entries = dict(node.entries)
                    node.pending = []
            for o in self.ops:
                o.durable = True
        elif op == "link":  # ("link", node, parent, name)
            _, nid, parent, name = ev
            self._dir_op([(parent, name, nid)])
        elif op == "rename":  # ("rename", src parent, src name, dst parent, dst name)
            _, sp, sn, dp, dn = ev
            nid = self.nodes[sp].entries[sn]
            self._dir_op([(sp, sn, None), (dp, dn, nid)])
        elif op == "remove":  # ("remove", parent, name): unlink or rmdir
            self._dir_op([(ev[1], ev[2], None)])
        elif op != "mark":
            raise ValueError(ev)

    def _dir_op(self, effects: list[tuple[int, str, int | None]]) -> None:
        i = len(self.ops)
        self.ops.append(DirOp(effects))
        for d, name, nid in effects:
            if nid is None:
                self.nodes[d].entries.pop(name, None)
            else:
                self.nodes[d].entries[name] = nid
        for d in dict.fromkeys(d for d, _, _ in effects):
            self.nodes[d].pending.append(i)

    # -- what a power cut may leave
    def unsynced(self) -> tuple[list[int], list[int]]:
        """The dir ops that may be lost, and the files whose bytes may be lost."""
        ops = sorted({i for n in self.nodes.values() if n.kind == "d" for i in n.pending if not self.ops[i].durable})
        files = [k for k, n in self.nodes.items() if n.kind == "f" and bytes(n.data) != n.synced]
        return ops, files

    def state(self, kept_ops: set[int], file_modes: dict[int, tuple[str, float]]) -> dict[str, Any]:
        """The tree after a power cut: ``{relpath: bytes | None (directory) | ("link", relpath)}``."""
        entries: dict[int, dict[str, int]] = {}

        def dir_entries(d: int) -> dict[str, int]:
            if d not in entries:
                node = self.nodes[d]
                out = dict(node.synced_entries)
                for i in node.pending:
                    op = self.ops[i]
                    if op.durable or i in kept_ops:
                        for dd, name, nid in op.effects:
                            if dd != d:
                                continue
                            if nid is None:
                                out.pop(name, None)
                            else:
                                out[name] = nid
                entries[d] = out
            return entries[d]

        tree: dict[str, Any] = {}
        first_path: dict[int, str] = {}

        def walk(d: int, prefix: str) -> None:
            for name, nid in sorted(dir_entries(d).items()):
                rel = f"{prefix}{name}"
                node = self.nodes[nid]
                if node.kind == "d":
                    if nid in first_path:  # a directory reachable twice: not a state a file system can be in
                        raise AssertionError(f"directory {rel} also at {first_path[nid]}")
                    first_path[nid] = rel
                    tree[rel] = None
                    walk(nid, rel + "/")
                elif nid in first_path:
                    tree[rel] = ("link", first_path[nid])
                else:
                    first_path[nid] = rel
                    tree[rel] = _file_bytes(node, *file_modes.get(nid, ("kept", 0.0)))

        walk(0, "")
        return tree


def _file_bytes(node: Node, mode: str, frac: float) -> bytes:
    now, synced = bytes(node.data), node.synced
    if mode == "kept" or now == synced:
        return now
    if mode == "lost":
        return synced
    if mode == "truncated":
        return now[: int(len(now) * frac)]
    if mode == "zeroed":  # the un-synced extent reads back as zeros
        keep = min(len(synced), len(now))
        return now[:keep] + bytes(len(now) - keep)
    raise ValueError(mode)


MODES = ("lost", "kept", "truncated", "zeroed")


def digest(tree: dict[str, Any], prefix: str = "", skip_below: str | None = None) -> str:
    """A digest of the tree's entries under ``prefix`` (names and bytes); with ``skip_below``,
    of the names only of the entries directly in that directory, not of what they hold."""
    h = hashlib.sha256()
    for rel, v in sorted(tree.items()):
        if not rel.startswith(prefix):
            continue
        if skip_below is not None and rel.startswith(skip_below + "/"):
            if "/" in rel[len(skip_below) + 1 :]:
                continue
            v = None
        h.update(rel.encode() + b"\0")
        if v is None:
            h.update(b"d")
        elif isinstance(v, tuple):
            h.update(b"l" + v[1].encode())
        else:
            h.update(b"f" + hashlib.sha256(v).digest())
        h.update(b"\0")
    return h.hexdigest()


@dataclass
class CrashState:
    point: int  # the number of log entries applied before the cut
    kind: str  # "exhaustive", "all-lost", "all-kept", "sampled"
    tree: dict[str, Any]


def crash_states(
    initial: Model,
    log: list[tuple],
    *,
    exhaustive: int = 64,
    samples: int = 4,
    seed: int = 0,
    opaque: str | None = None,
) -> Iterator[CrashState]:
    """After every entry of ``log``, the trees a power cut may leave (see the module docstring),
    each distinct tree once; trees that differ only inside the entries of directory ``opaque``
    count as one (the staging area: cleanup removes its entries without reading them)."""
    rng = random.Random(seed)
    m = initial.copy()
    seen: set[str] = set()
    for point in range(len(log) + 1):
        if point:
            m.apply(log[point - 1])
            if log[point - 1][0] == "mark":
                continue
        ops, files = m.unsynced()
        combos = (2 ** len(ops)) * (len(MODES) ** len(files))
        choices: list[tuple[str, set[int], dict[int, tuple[str, float]]]] = []
        if combos <= exhaustive:
            for kept in itertools.product((False, True), repeat=len(ops)):
                for modes in itertools.product(MODES, repeat=len(files)):
                    choices.append(
                        (
                            "exhaustive",
                            {o for o, k in zip(ops, kept) if k},
                            {f: (md, 0.5) for f, md in zip(files, modes)},
                        )
                    )
        else:
            choices.append(("all-lost", set(), {f: ("lost", 0.0) for f in files}))
            choices.append(("all-kept", set(ops), {f: ("kept", 0.0) for f in files}))
            for _ in range(samples):
                kept_ops = {o for o in ops if rng.random() < 0.5}
                modes = {f: (rng.choice(MODES), rng.random()) for f in files}
                choices.append(("sampled", kept_ops, modes))
        for kind, kept_ops, modes in choices:
            tree = m.state(kept_ops, modes)
            d = digest(tree, skip_below=opaque)
            if d not in seen:
                seen.add(d)
                yield CrashState(point, kind, tree)


def materialize(tree: dict[str, Any], root: str) -> None:
    os.makedirs(root)
    for rel, v in sorted(tree.items(), key=lambda kv: kv[0].count("/")):
        path = os.path.join(root, *rel.split("/"))
        if v is None:
            os.makedirs(path, exist_ok=True)
    for rel, v in tree.items():
        path = os.path.join(root, *rel.split("/"))
        if isinstance(v, bytes):
            with open(path, "wb") as f:
                f.write(v)
    for rel, v in tree.items():
        if isinstance(v, tuple):
            os.link(os.path.join(root, *v[1].split("/")), os.path.join(root, *rel.split("/")))


# --------------------------------------------------------------------------- recording


def _ident(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


_WRAPPED = ("open", "write", "writev", "fsync", "fdatasync", "mkdir", "link", "rename", "replace", "unlink", "rmdir")


class Recorder:
    """Logs the file-system changes under ``root`` as :class:`Model` operations (see the
    module docstring).  Use as a context manager around the code to record; :meth:`mark`
    adds a label to the log (what the program had been told by then)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.initial = Model.snapshot(self.root)
        self.live = self.initial.copy()  # follows the real tree, to resolve paths to nodes
        self.log: list[tuple] = []
        self.lock = threading.RLock()
        self.fds: dict[int, tuple[str, int]] = {}  # fd -> (path, node) for files and dirs under root
        self.offsets: dict[int, int] = {}
        self._real: dict[str, Any] = {}

    # -- paths
    def _abs(self, path: Any, dir_fd: int | None) -> str:
        p = os.fsdecode(path)
        if dir_fd is not None and dir_fd != AT_FDCWD and not os.path.isabs(p):
            base = self.fds.get(dir_fd)
            if base is None:
                return ""
            p = os.path.join(base[0], p)
        return os.path.normpath(os.path.abspath(p))

    def _rel(self, p: str) -> str | None:
        if p == self.root:
            return ""
        if p.startswith(self.root + os.sep):
            return p[len(self.root) + 1 :]
        return None

    def _split(self, p: str) -> tuple[int, str] | None:
        """(parent node, name) of an absolute path under the root."""
        rel = self._rel(p)
        if not rel:
            return None
        parent_rel, _, name = rel.rpartition("/")
        parent = self.live.resolve(parent_rel)
        if parent is None:
            raise AssertionError(f"recorder lost track of {p}")
        return parent, name

    def _emit(self, ev: tuple) -> None:
        self.live.apply(ev)
        self.log.append(ev)

    def mark(self, *label: Any) -> None:
        with self.lock:
            self.log.append(("mark", *label))

    # -- the wrappers
    def _open(self, path, flags, mode=0o777, *, dir_fd=None):
        p = self._abs(path, dir_fd)
        rel = self._rel(p)
        if rel is None:
            return self._real["open"](path, flags, mode, dir_fd=dir_fd)
        with self.lock:
            existed = os.path.lexists(p)
            fd = self._real["open"](path, flags, mode, dir_fd=dir_fd)
            if flags & os.O_CREAT and not existed:
                parent, name = self._split(p)  # type: ignore[misc]
                self._emit(("create", parent, name, "f", len(self.live.nodes)))
            node = self.live.resolve(rel)
            if node is not None:
                self.fds[fd] = (p, node, _ident(fd))
                self.offsets[fd] = 0
            return fd

    def _node_of(self, fd: int) -> int | None:
        """The node open as ``fd`` (None for a descriptor we did not open, or one closed and
        reused since: closes through file objects are not seen, so identities are compared)."""
        got = self.fds.get(fd)
        if got is None:
            return None
        if _ident(fd) != got[2]:
            del self.fds[fd]
            return None
        return got[1]

    def _write(self, fd, data):
        n = self._real["write"](fd, data)
        self._wrote(fd, bytes(memoryview(data).cast("B")[:n]))
        return n

    def _writev(self, fd, bufs):
        bufs = list(bufs)
        n = self._real["writev"](fd, bufs)
        self._wrote(fd, b"".join(bytes(memoryview(b).cast("B")) for b in bufs)[:n])
        return n

    def _wrote(self, fd: int, data: bytes) -> None:
        with self.lock:
            node = self._node_of(fd)
            if node is not None:
                self._emit(("write", node, self.offsets[fd], data))
                self.offsets[fd] += len(data)

    def _sync(self, name: str):
        def sync(fd):
            # under the lock, so that no entry created meanwhile is logged before the sync and
            # taken for durable
            with self.lock:
                out = self._real[name](fd)
                node = self._node_of(fd)
                if node is not None:
                    self._emit(("fsync", node))
            return out

        return sync

    def _syncfs(self, fd):
        with self.lock:
            out = self._real["syncfs"](fd)
            if out == 0:
                self._emit(("syncfs",))
            return out

    def _mkdir(self, path, mode=0o777, *, dir_fd=None):
        p = self._abs(path, dir_fd)
        with self.lock:
            out = self._real["mkdir"](path, mode, dir_fd=dir_fd)
            where = self._split(p)
            if where is not None:
                self._emit(("create", *where, "d", len(self.live.nodes)))
            return out

    def _link(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None, follow_symlinks=True):
        s, d = self._abs(src, src_dir_fd), self._abs(dst, dst_dir_fd)
        with self.lock:
            out = self._real["link"](
                src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=follow_symlinks
            )
            where = self._split(d)
            if where is not None:
                node = self.live.resolve(self._rel(s) or "")
                assert node is not None, f"link from outside the store: {s}"
                self._emit(("link", node, *where))
            return out

    def _rename_between(self, s: str, d: str) -> None:
        a, b = self._split(s), self._split(d)
        if a is None and b is None:
            return
        assert a is not None and b is not None, f"rename across the store boundary: {s} -> {d}"
        self._emit(("rename", *a, *b))

    def _rename(self, name: str):
        def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            s, d = self._abs(src, src_dir_fd), self._abs(dst, dst_dir_fd)
            with self.lock:
                out = self._real[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
                self._rename_between(s, d)
                return out

        return rename

    def _renameat2(self, olddirfd, old, newdirfd, new, flags):
        with self.lock:
            out = self._real["renameat2"](olddirfd, old, newdirfd, new, flags)
            if out == 0:
                self._rename_between(self._abs(old, olddirfd), self._abs(new, newdirfd))
            return out

    def _remove(self, name: str):
        def remove(path, *, dir_fd=None):
            p = self._abs(path, dir_fd)
            with self.lock:
                out = self._real[name](path, dir_fd=dir_fd)
                where = self._split(p)
                if where is not None:
                    self._emit(("remove", *where))
                return out

        return remove

    def __enter__(self) -> Recorder:
        from computable_flows_shim import _platform

        wrappers = {
            "open": self._open,
            "write": self._write,
            "writev": self._writev,
            "fsync": self._sync("fsync"),
            "fdatasync": self._sync("fdatasync"),
            "mkdir": self._mkdir,
            "link": self._link,
            "rename": self._rename("rename"),
            "replace": self._rename("replace"),
            "unlink": self._remove("unlink"),
            "rmdir": self._remove("rmdir"),
        }
        for name in _WRAPPED:
            self._real[name] = getattr(os, name)
            setattr(os, name, wrappers[name])
        self._real["renameat2"] = _platform._renameat2
        if _platform._renameat2 is not None:
            _platform._renameat2 = self._renameat2
        self._real["syncfs"] = _platform._syncfs
        if _platform._syncfs is not None:
            _platform._syncfs = self._syncfs
        return self

    def __exit__(self, *exc: Any) -> None:
        from computable_flows_shim import _platform

        for name in _WRAPPED:
            setattr(os, name, self._real[name])
        _platform._renameat2 = self._real["renameat2"]
        _platform._syncfs = self._real["syncfs"]


__all__ = ["Recorder", "Model", "crash_states", "materialize", "CrashState"]
