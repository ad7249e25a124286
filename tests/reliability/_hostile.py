"""A corpus of hostile checkpoints, and the process that reads them under an audit hook.

:func:`build_corpus` writes one valid checkpoint and then crafted variants of it, each
a checkpoint directory of its own: pickled objects and object dtypes, unknown codecs and
a decompression bomb, path traversal and absolute paths, symlinks out of the store (to
files and to directories, on the way and at the end), FIFOs, sockets, device nodes and
directories where files belong, shapes whose product overflows or that no file backs,
huge and deeply nested JSON, text chunks whose counts would allocate gigabytes, bad PRNG
implementations...  Most carry valid metadata checksums (``tests/forge.py``: a hostile
writer knows the format); some are in the pre-checksum form, so that every check is
reached without them too.

``python _hostile.py STORE OUTSIDE CANARY`` then opens every checkpoint of STORE the ways
a user can (list, verify, load, lazy view slices, telemetry) with ``sys.addaudithook``
recording every file opened and directory listed (which must lie in the checkpoint),
and any exec/compile/pickle/subprocess/import event (code execution), and tracemalloc
recording each case's peak memory.  It prints one JSON line per case.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import socket
import stat
import sys
import time
import zlib

import crc32c
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for forge

NT = collections.namedtuple("NT", "a b")
BASE = "base-i000000000001"  # every leaf its own array (pack_max_bytes=0)
PBASE = "pbase-i000000000001"  # the same state with its small leaves packed (the default)
# A protocol-0 pickle that runs `touch CANARY` when unpickled: nothing may unpickle it.
PICKLE = "cos\nsystem\n(S'touch {canary}'\ntR."


def base_state():
    import jax

    return {
        "x": np.arange(20, dtype=np.float32).reshape(4, 5),
        "k": jax.random.key(1),
        "n": NT(np.array([1, 2, 3], np.int16), 2.5),
        "s": "text",
        # format v2's codecs, so that the warm-up read loads what decoding them loads
        "nested": {"y": np.arange(3, dtype=np.int64), "zstd": np.zeros(64, np.float32), "blosc": np.ones(64)},
    }


def base_compression(path, array):
    """``nested/zstd`` and ``nested/blosc`` compressed (even where that saves nothing), the rest not."""
    from computable_flows_shim import Compression

    name = path.split("/")[-1]
    return Compression(name, min_saving=0) if path in ("nested/zstd", "nested/blosc") else None


def base_history():
    return {
        "iter": [0, 1, 2],
        "E": [3.0, 2.0, 1.0],
        "phase": ["A", "B", "C"],
        "events": [{"type": "X", "iter": 1, "payload": {"a": 1}}],
    }


class Case:
    def __init__(self, store: str, name: str, outside: str, canary: str, base: str = BASE) -> None:
        import forge

        self.forge = forge
        self.cid = f"{name}-i000000000001"
        self.dir = os.path.join(store, self.cid)
        self.outside, self.canary = outside, canary
        shutil.copytree(os.path.join(store, base), self.dir, symlinks=True)
        self.edit("", lambda d: d["attributes"].update(checkpoint_id=self.cid, run_id=name))

    def p(self, rel: str) -> str:
        return os.path.join(self.dir, *rel.split("/"))

    def meta(self, rel: str) -> dict:
        return self.forge.load(self.p(rel + "/zarr.json") if rel else self.p("zarr.json"))

    def edit(self, rel: str, mutate) -> None:
        """Change a zarr.json and re-sign: a hostile writer's valid checksums."""
        self.forge.edit(self.dir, rel, mutate)

    def resign(self) -> None:
        self.forge.resign(self.dir)

    def legacy(self, mutate=None, raw_edit=None) -> None:
        """Rewrite the root without metadata checksums (the pre-checksum form); ``mutate``
        the document, then ``raw_edit`` its bytes."""
        doc = self.meta("")
        for k in ("cfs_metadata_crc32c", "cfs_root_crc32c"):
            doc["attributes"].pop(k, None)
        if mutate:
            mutate(doc)
        raw = json.dumps(doc).encode()
        with open(self.p("zarr.json"), "wb") as f:
            f.write(raw_edit(raw) if raw_edit else raw)

    def set_chunk(self, rel: str, key: str, body: bytes, index: int = 0) -> None:
        """Write a chunk with a valid trailer and manifest entry (so only deeper checks can refuse it)."""
        crc = crc32c.crc32c(body)
        with open(self.p(f"{rel}/{key}"), "wb") as f:
            f.write(body + crc.to_bytes(4, "little"))
        self.edit(rel, lambda d: d["attributes"]["cfs_chunk_crc32c"].__setitem__(index, crc))

    def replace(self, rel: str, make) -> None:
        """Replace a file (or directory) by what ``make(path)`` creates, keeping the checksums."""
        p = self.p(rel)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
        make(p)


CASES: list[tuple[str, bool, object]] = []


def case(name: str, refuse: bool = True, base: str = BASE):
    """``refuse``: a load must raise a library error (else it may also succeed harmlessly);
    ``base``: the checkpoint the case starts from."""

    def deco(fn):
        CASES.append((name, refuse, fn, base))
        return fn

    return deco


def packed(c: Case, key: str, mutate) -> None:
    """Change the ``packed`` member of top-level leaf ``key``'s pytree node (re-signed)."""

    def edit(d):
        tree = d["attributes"]["pytree"]
        mutate(tree["children"][tree["keys"].index(key)]["packed"])

    c.edit("", edit)


# packed leaves (format v3): the pytree node says where a leaf lies in its pack
case("packed-offset-past-the-pack", base=PBASE)(lambda c: packed(c, "x", lambda n: n.update(offset=10**9)))
case("packed-shape-overflow", base=PBASE)(lambda c: packed(c, "x", lambda n: n.update(shape=[2**40, 2**40])))
case("packed-shape-empty", base=PBASE)(lambda c: packed(c, "x", lambda n: n.update(shape=[0])))
case("packed-negative-offset", base=PBASE)(lambda c: packed(c, "x", lambda n: n.update(offset=-4)))
case("packed-array-traversal", base=PBASE)(lambda c: packed(c, "x", lambda n: n.update(array="../../outside")))
case("packed-array-other-group", base=PBASE)(lambda c: packed(c, "x", lambda n: n.update(array="state/nested")))
case("packed-array-missing", base=PBASE)(lambda c: packed(c, "x", lambda n: n.update(array="float16")))
case("packed-wrong-crc", base=PBASE)(lambda c: packed(c, "x", lambda n: n.update(crc32c=n["crc32c"] ^ 1)))
case("packed-crc-too-large", base=PBASE)(lambda c: packed(c, "x", lambda n: n.update(crc32c=2**40)))
case("packed-crc-not-int", base=PBASE)(lambda c: packed(c, "x", lambda n: n.update(crc32c="0")))
case("packed-prng-impl-pickle", base=PBASE)(lambda c: packed(c, "k", lambda n: n.update(cfs_prng_key_impl="pickle")))
case("packed-member-not-object", base=PBASE)(
    lambda c: c.edit("", lambda d: d["attributes"]["pytree"]["children"][0].update(packed=[1, 2]))
)


@case("packed-pack-rewritten-valid-trailer", base=PBASE)
def _(c):  # the pack chunk's bytes changed with a valid trailer and manifest: only the leaf CRC32C sees it
    path = c.p("packed/float32/c.0")
    with open(path, "rb") as f:
        body = bytearray(f.read()[:-4])
    body[0] ^= 0xFF
    c.set_chunk("packed/float32", "c.0", bytes(body))


@case("packed-pack-as-another-type", base=PBASE)
def _(c):  # the float32 pack relabelled int32: a leaf would be read as the wrong type
    c.edit("packed/float32", lambda d: d.update(data_type="int32"))


@case("packed-pack-2d", base=PBASE)
def _(c):
    c.edit("packed/float32", lambda d: d.update(shape=[1, d["shape"][0]]))


@case("packed-pack-chunk-symlink-out", base=PBASE)
def _(c):
    c.replace("packed/float32/c.0", lambda p: os.symlink(c.canary, p))


@case("packed-pack-missing", base=PBASE)
def _(c):
    shutil.rmtree(c.p("packed/int64"))
    c.resign()


def _dtype(t):
    return lambda c: c.edit("state/x", lambda d: d.update(data_type=t))


for _i, _t in enumerate(["object", "|O", "O", "pickle", {"name": "pickle"}, "<U10", "str", "float128", "V8", "bytes"]):
    case(f"dtype{_i}")(_dtype(_t))
case("dtype-datetime")(_dtype("datetime64[ns]"))
case("dtype-none")(lambda c: c.edit("state/x", lambda d: d.pop("data_type")))


@case("pickled-object-array")
def _(c):
    body = PICKLE.format(canary=c.canary).encode()
    c.edit("state/x", lambda d: d.update(data_type="object", codecs=[{"name": "pickle"}, {"name": "crc32c"}]))
    c.set_chunk("state/x", "c.0.0", body)


@case("pickle-in-attributes", refuse=False)
def _(c):  # a string is a string: never unpickled
    c.edit("", lambda d: d["attributes"]["metadata"].update(p=PICKLE.format(canary=c.canary)))


def _codecs(codecs):
    return lambda c: c.edit("state/x", lambda d: d.update(codecs=codecs))


_B = {"name": "bytes", "configuration": {"endian": "little"}}
for _i, _cs in enumerate(
    [
        [_B, {"name": "gzip", "configuration": {"level": 9}}, {"name": "crc32c"}],
        [_B, {"name": "blosc", "configuration": {"cname": "zstd"}}, {"name": "crc32c"}],
        [_B, {"name": "zstd"}, {"name": "crc32c"}],
        [{"name": "transpose", "configuration": {"order": [1, 0]}}, _B, {"name": "crc32c"}],
        [{"name": "sharding_indexed", "configuration": {}}],
        [_B],
        "bytes",
        [_B, {"name": "crc32c"}, {"name": "crc32c"}],
        [{"name": "bytes", "configuration": {"endian": "big"}}, {"name": "crc32c"}],
        [{"name": "bytes", "configuration": "little"}, {"name": "crc32c"}],
    ]
):
    case(f"codecs{_i}")(_codecs(_cs))


@case("decompression-bomb")
def _(c):  # 1 GiB of zeros in a 1 MiB gzip stream: must be refused before anything is decompressed
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    body = b"".join(z.compress(block) for _ in range(1024)) + z.flush()
    c.edit(
        "state/x", lambda d: d.update(codecs=[_B, {"name": "gzip", "configuration": {"level": 9}}, {"name": "crc32c"}])
    )
    c.set_chunk("state/x", "c.0.0", body)


_ZSTD = {"name": "zstd", "configuration": {"level": 3, "checksum": False}}
_BLOSC = {
    "name": "blosc",
    "configuration": {"typesize": 4, "cname": "zstd", "clevel": 5, "shuffle": "shuffle", "blocksize": 0},
}


def _compressed(codec, body):
    """state/x (80 bytes of float32) compressed with ``codec``, its chunk replaced by ``body``."""

    def fn(c):
        c.edit("state/x", lambda d: d.update(codecs=[_B, codec, {"name": "crc32c"}]))
        c.set_chunk("state/x", "c.0.0", body)

    return fn


def _zstd(data, level=19):
    import numcodecs

    return numcodecs.Zstd(level=level).encode(data)


def _blosc(data, nbytes=None):
    import numcodecs

    out = bytearray(numcodecs.Blosc("zstd", 5, 1, typesize=4).encode(data))
    if nbytes is not None:  # a header that lies about the decoded size
        out[4:8] = nbytes.to_bytes(4, "little")
    return bytes(out)


# format v2's codecs on hostile bytes: a bomb is refused by the file's size or its stated size,
# before anything is decompressed; a header that lies is refused by the decoder
case("zstd-bomb")(lambda c: _compressed(_ZSTD, _zstd(bytes(1 << 30)))(c))
case("zstd-bomb-small")(lambda c: _compressed(_ZSTD, _zstd(bytes(4 << 10)))(c))
case("zstd-short")(lambda c: _compressed(_ZSTD, _zstd(bytes(40)))(c))
case("zstd-no-content-size")(lambda c: _compressed(_ZSTD, b"\x28\xb5\x2f\xfd\x00\x58" + bytes(60))(c))
case("zstd-garbage")(lambda c: _compressed(_ZSTD, _zstd(bytes(80))[:6] + bytes(30))(c))
case("blosc-bomb")(lambda c: _compressed(_BLOSC, _blosc(bytes(16 << 20)))(c))
case("blosc-lying-header")(lambda c: _compressed(_BLOSC, _blosc(bytes(range(40)), nbytes=80))(c))
case("blosc-garbage")(lambda c: _compressed(_BLOSC, _blosc(bytes(80))[:16] + bytes(64))(c))
case("compressed-text")(
    lambda c: c.edit("telemetry/phase", lambda d: d.update(codecs=[{"name": "vlen-utf8"}, _ZSTD, {"name": "crc32c"}]))
)


def _shape(shape, chunk=None, crcs=None):
    def fn(c):
        def m(d):
            d["shape"] = shape
            if chunk is not None:
                d["chunk_grid"]["configuration"]["chunk_shape"] = chunk
            if crcs is not None:
                d["attributes"]["cfs_chunk_crc32c"] = crcs

        c.edit("state/x", m)

    return fn


case("shape-2**63")(_shape([2**63, 5]))
case("shape-overflow")(_shape([2**40, 2**40], [1, 1]))
case("shape-negative")(_shape([-4, 5]))
case("shape-float")(_shape([4.0, 5]))
case("shape-string")(_shape("big"))
case("shape-65-dims")(_shape([1] * 65, [1] * 65))
case("shape-zero-times-huge")(_shape([2**100, 0], [1, 1], []))
case("chunk-zero")(_shape([4, 5], [0, 5]))
case("chunk-2**41")(_shape([4, 5], [2**41, 5]))
case("chunk-over-4GiB")(_shape([2**20, 2**20], [2**20, 2**20]))
case("chunk-dims-mismatch")(_shape([4, 5], [4]))
case("crcs-too-few")(_shape([8, 5], [4, 5], [0]))
case("shape-2**50-unbacked")(
    lambda c: c.edit(
        "state/x",
        lambda d: d.update(
            shape=[2**50],
            data_type="uint8",
            chunk_grid={"name": "regular", "configuration": {"chunk_shape": [2**32]}},
            attributes={"cfs_chunk_crc32c": [0] * 2**18},
        ),
    )
)
case("crcs-bad-values")(lambda c: c.edit("state/x", lambda d: d["attributes"].update(cfs_chunk_crc32c=[-1])))
case("crcs-bool")(lambda c: c.edit("state/x", lambda d: d["attributes"].update(cfs_chunk_crc32c=[True])))
case("key-encoding-v2")(lambda c: c.edit("state/x", lambda d: d.update(chunk_key_encoding={"name": "v2"})))
case("key-separator-dotdot")(
    lambda c: c.edit(
        "state/x", lambda d: d.update(chunk_key_encoding={"name": "default", "configuration": {"separator": "/../"}})
    )
)
case("key-configuration-list")(
    lambda c: c.edit("state/x", lambda d: d.update(chunk_key_encoding={"name": "default", "configuration": [1]}))
)


@case("sparse-512GiB-array")
def _(c):  # every chunk file there, at the right (sparse) size: refused at allocation, not read
    n = 2**36 // 2**23

    def m(d):
        d.update(shape=[2**36], data_type="float64", dimension_names=["x.d0"])
        d["chunk_grid"]["configuration"]["chunk_shape"] = [2**23]
        d["attributes"]["cfs_chunk_crc32c"] = [0] * n

    c.edit("state/x", m)
    os.unlink(c.p("state/x/c.0.0"))
    for i in range(n):
        with open(c.p(f"state/x/c.{i}"), "wb") as f:
            f.truncate(2**23 * 8 + 4)


def _path(path):
    return lambda c: c.edit("", lambda d: d["attributes"]["pytree"]["children"][0].update(path=path))


for _i, _pth in enumerate(
    [
        "../../../etc/passwd",
        "/etc/passwd",
        "x/../../..",
        "x\\..\\..",
        "x\x00",
        "",
        ".",
        "x//y",
        "..",
        "../" + BASE + "/state/x",
    ]
):
    case(f"path{_i}")(_path(_pth))


@case("separator-slash-symlinked-dir")
def _(c):  # chunk key c/0/0 whose directory c is a symlink out of the checkpoint (to a valid chunk)
    out = os.path.join(c.outside, c.cid, "c", "0")
    os.makedirs(out)
    shutil.copyfile(c.p("state/x/c.0.0"), os.path.join(out, "0"))
    c.edit("state/x", lambda d: d.update(chunk_key_encoding={"name": "default", "configuration": {"separator": "/"}}))
    os.unlink(c.p("state/x/c.0.0"))
    os.symlink(os.path.join(c.outside, c.cid, "c"), c.p("state/x/c"))


def _symlink_out(rel, legacy=False):
    def fn(c):
        target = os.path.join(c.outside, c.cid, os.path.basename(rel))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        src = c.p(rel)
        (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, target)
        c.replace(rel, lambda p: os.symlink(target, p))
        if legacy:
            c.legacy()

    return fn


for _rel in ["state", "telemetry", "state/x", "state/x/c.0.0", "state/x/zarr.json", "telemetry/E", "telemetry/E/c.0"]:
    case(f"symlink-out:{_rel}")(_symlink_out(_rel))
    case(f"symlink-out-legacy:{_rel}", refuse=_rel != "telemetry/E")(_symlink_out(_rel, legacy=True))
case("symlink-out:root-zarr.json")(_symlink_out("zarr.json"))


def _special(rel, kind, legacy=True):
    def make(p):
        if kind == "fifo":
            os.mkfifo(p)
        elif kind == "dir":
            os.mkdir(p)
        elif kind == "socket":
            s, cwd = socket.socket(socket.AF_UNIX), os.getcwd()
            os.chdir(os.path.dirname(p))  # AF_UNIX paths are limited to 108 bytes
            try:
                s.bind(os.path.basename(p))
            finally:
                os.chdir(cwd)
                s.close()
        elif kind == "devzero":
            os.mknod(p, 0o644 | stat.S_IFCHR, os.makedev(1, 5))

    def fn(c):
        c.replace(rel, make)
        if legacy:
            c.legacy()

    return fn


for _rel in ["state/x/c.0.0", "state/x/zarr.json", "telemetry/phase/c.0"]:
    for _kind in ["fifo", "dir", "socket", "devzero"]:
        case(f"{_kind}:{_rel}")(_special(_rel, _kind, legacy=_rel.endswith("zarr.json")))
case("file-instead-of-array-dir")(_special("state/x", "devzero"))


@case("root-17MiB")
def _(c):
    c.edit("", lambda d: d["attributes"]["metadata"].update(pad="x" * (17 << 20)))


@case("root-15MiB-attribute", refuse=False)
def _(c):
    c.edit("", lambda d: d["attributes"]["metadata"].update(pad="x" * (15 << 20)))


@case("root-nested-200000")
def _(c):
    deep = b"[" * 200_000 + b"]" * 200_000
    c.legacy(raw_edit=lambda raw: raw.replace(b'"flow_config": {"op": "x"}', b'"flow_config": ' + deep))


@case("pytree-depth-150")
def _(c):
    node = {"kind": "none"}
    for _ in range(150):
        node = {"kind": "list", "children": [node]}
    c.edit("", lambda d: d["attributes"].update(pytree=node))


@case("pytree-200000-nodes", refuse=False)
def _(c):
    c.edit("", lambda d: d["attributes"].update(pytree={"kind": "list", "children": [{"kind": "none"}] * 200_000}))


@case("iteration-5000-digits")
def _(c):
    c.legacy(raw_edit=lambda raw: raw.replace(b'"iteration": 1', b'"iteration": 1' + b"0" * 5000))


@case("nan-literals")
def _(c):
    c.legacy(raw_edit=lambda raw: raw.replace(b'"iteration": 1', b'"iteration": NaN'))


def _tree(mutate):
    return lambda c: c.edit("", lambda d: mutate(d["attributes"]["pytree"]))


case("dict-duplicate-keys")(_tree(lambda t: t.update(keys=["x", "x", "n", "s", "nested"])))
case("dict-list-key")(_tree(lambda t: t.update(keys=[["x"], "k", "n", "s", "nested"])))
case("dict-bool-key")(_tree(lambda t: t.update(keys=[True, "k", "n", "s", "nested"])))
case("kind-pickle")(_tree(lambda t: t.update(kind="pickle")))
case("kind-eval")(_tree(lambda t: t["children"][3].update(kind="eval", value="__import__('os').system('true')")))
case("scalar-complex-bad")(_tree(lambda t: t["children"][3].update(type="complex", value=["1", "x"])))
case("scalar-type-object")(_tree(lambda t: t["children"][3].update(type="object")))
case("children-not-list")(_tree(lambda t: t.update(children={"a": 1})))
case("array-no-path")(_tree(lambda t: t["children"][0].pop("path")))
case("namedtuple-evil-names", refuse=False)(
    _tree(
        lambda t: t["children"][2].update(
            name="os.system('touch x')",
            keys=["__class__", "import os; os.system('x')"],
            children=t["children"][2]["children"],
        )
    )
)
case("prng-impl-pickle")(lambda c: c.edit("state/k", lambda d: d["attributes"].update(cfs_prng_key_impl="pickle")))
case("prng-impl-module-path")(
    lambda c: c.edit("state/k", lambda d: d["attributes"].update(cfs_prng_key_impl="os.system"))
)
case("prng-wrong-key-shape")(lambda c: c.edit("state/x", lambda d: d["attributes"].update(cfs_prng_key_impl="rbg")))
case("renamed-by-hand")(lambda c: c.edit("", lambda d: d["attributes"].update(checkpoint_id="other-i000000000001")))
case("format-version-4")(lambda c: c.edit("", lambda d: d["attributes"].update(format_version=4)))
case("format-name")(lambda c: c.edit("", lambda d: d["attributes"].update(format="zarr")))


@case("checksum-keys-traversal")
def _(c):  # validly signed root whose checksum list names a file outside
    from computable_flows_shim._format.root import root_bytes

    doc = c.meta("")
    doc["attributes"]["cfs_metadata_crc32c"]["state/../../../etc/zarr.json"] = 0
    with open(c.p("zarr.json"), "wb") as f:
        f.write(root_bytes(doc["attributes"], None))


@case("zarr-v2-array")
def _(c):
    os.rename(c.p("state/x/zarr.json"), c.p("state/x/.zarray"))
    c.legacy()


@case("text-count-2**31")
def _(c):  # a text chunk claiming 2**31 - 1 strings, with a valid CRC: refused before the decoder allocates
    c.set_chunk("telemetry/phase", "c.0", (2**31 - 1).to_bytes(4, "little") + b"\x01\x00\x00\x00A" * 3)


@case("text-lengths-beyond")
def _(c):
    c.set_chunk("telemetry/phase", "c.0", (3).to_bytes(4, "little") + (2**31).to_bytes(4, "little") + b"A" * 16)


@case("text-shape-2**30")
def _(c):  # one chunk of 2**30 strings would be a 8 GiB object array: the file cannot hold them
    c.edit(
        "telemetry/phase",
        lambda d: d.update(shape=[2**30], chunk_grid={"name": "regular", "configuration": {"chunk_shape": [2**30]}}),
    )


@case("event-payload-nested-100000")
def _(c):
    import numcodecs

    payload = "[" * 100_000 + "]" * 100_000
    body = numcodecs.VLenUTF8().encode(np.array([payload], dtype=object))
    c.set_chunk("telemetry/event_payload", "c.0", bytes(body))


@case("telemetry-column-added-unsigned")
def _(c):  # an extra column directory (not in the checksums)
    shutil.copytree(c.p("telemetry/E"), c.p("telemetry/Evil"))


@case("telemetry-missing")
def _(c):
    shutil.rmtree(c.p("telemetry"))
    c.resign()


# --------------------------------------------------------------------------- building and reading


def build_corpus(store: str, outside: str, canary: str) -> list[tuple[str, bool]]:
    """Write the base checkpoint and every case into ``store``; returns (checkpoint id, must refuse)."""
    from computable_flows_shim import CheckpointManager

    mgr = CheckpointManager(store, compression=base_compression, pack_max_bytes=0)
    mgr.create_checkpoint("base", 1, base_state(), {"op": "x"}, telemetry_history=base_history())
    packing = CheckpointManager(store, compression=base_compression)
    packing.create_checkpoint("pbase", 1, base_state(), {"op": "x"}, telemetry_history=base_history())
    out = []
    for name, refuse, fn, base in CASES:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        c = Case(store, safe, outside, canary, base)
        fn(c)  # type: ignore[operator]
        out.append((c.cid, refuse))
    return out


CODE_EVENTS = {
    "exec",
    "compile",
    "pickle.find_class",
    "os.system",
    "subprocess.Popen",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "ctypes.dlopen",
    "import",
    "marshal.loads",
}
# collections.namedtuple builds __new__ with eval of a fixed template over field names it has
# checked are identifiers (rename=True); that is the only code a restore compiles.
NAMEDTUPLE_NEW = re.compile(r"lambda _cls, [A-Za-z_][A-Za-z0-9_, ]*: _tuple_new\(_cls, \([A-Za-z0-9_, ]*\)\)")


def main() -> None:
    store, outside, canary = sys.argv[1:4]
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import warnings

    import jax

    from computable_flows_shim import CheckpointManager, ComputableFlowsError

    jax.config.update("jax_enable_x64", True)
    warnings.simplefilter("ignore")
    mgr = CheckpointManager(store)

    def exercise(cid: str) -> dict:
        ops: dict = {}
        for op in ("verify", "load", "view", "telemetry"):
            try:
                if op == "verify":
                    ops[op] = "ok" if mgr.verify_checkpoint(cid).ok else "problems"
                    continue
                if op == "load":
                    mgr.load_checkpoint(cid)
                elif op == "view":
                    leaves = jax.tree_util.tree_leaves(mgr.open_checkpoint(cid).state)
                    for leaf in leaves:
                        if hasattr(leaf, "chunk_shape"):
                            leaf[tuple(slice(0, 1) for _ in leaf.shape)]
                else:
                    _ = mgr.open_checkpoint(cid).telemetry
                ops[op] = "ok"
            except ComputableFlowsError as e:
                ops[op] = f"{type(e).__name__}: {str(e)[:300]}"
            except BaseException as e:  # noqa: BLE001 - the point of the test
                ops[op] = f"FOREIGN {type(e).__name__}: {str(e)[:300]}"
        return ops

    exercise(BASE)  # warm up: every lazy import happens here, outside the audit
    exercise(PBASE)
    mgr.list_checkpoints()
    allowed: list[str | None] = [None]
    violations: list[str] = []
    guard = [False]

    def inside(path: str, root: str) -> bool:
        p = os.path.realpath(path)
        return p == root or p.startswith(root + os.sep)

    def hook(event: str, args: tuple) -> None:
        if allowed[0] is None or guard[0]:
            return
        guard[0] = True
        try:
            if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes)):
                path = os.fsdecode(args[0])
                flags = args[2] if event == "open" and len(args) > 2 and isinstance(args[2], int) else 0
                parent_ok = inside(os.path.dirname(os.path.abspath(path)) or ".", allowed[0])
                end_ok = not os.path.islink(path) or flags & os.O_NOFOLLOW or inside(path, allowed[0])
                if not (parent_ok and end_ok) and not inside(path, allowed[0]):
                    violations.append(f"{event} {path}")
            elif event in CODE_EVENTS:
                src = args[0] if args else None
                if event == "compile" and isinstance(src, (str, bytes)) and NAMEDTUPLE_NEW.fullmatch(os.fsdecode(src)):
                    return
                if event == "exec" and getattr(src, "co_filename", None) == "<string>":
                    return  # the namedtuple template compiled above
                violations.append(f"{event} {str(args)[:200]}")
        finally:
            guard[0] = False

    def rss(field: str) -> int:  # kB lines of /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    def reset_peak_rss() -> int:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        return rss("VmRSS:")

    sys.addaudithook(hook)
    # the hook works: opening the base checkpoint while another one is being read is caught
    allowed[0] = os.path.realpath(os.path.join(store, "nowhere"))
    open(os.path.join(store, BASE, "zarr.json"), "rb").close()
    allowed[0] = None
    print(json.dumps({"id": "<self-test>", "ops": {}, "violations": list(violations), "peak": 0}), flush=True)
    violations.clear()
    ids = sorted(n for n in os.listdir(store) if n not in (BASE, PBASE) and not n.startswith("."))
    for cid in ids:
        base = reset_peak_rss()
        violations.clear()
        allowed[0] = os.path.realpath(os.path.join(store, cid))
        t = time.perf_counter()
        ops = exercise(cid)
        allowed[0] = None
        peak = rss("VmHWM:") - base
        print(
            json.dumps(
                {
                    "id": cid,
                    "ops": ops,
                    "violations": list(violations),
                    "peak": peak,
                    "seconds": time.perf_counter() - t,
                }
            ),
            flush=True,
        )
    base = reset_peak_rss()
    allowed[0] = os.path.realpath(store)
    try:
        listed = len(mgr.list_checkpoints())
        listing = "ok"
    except ComputableFlowsError as e:
        listed, listing = 0, f"{type(e).__name__}: {e}"
    except BaseException as e:  # noqa: BLE001
        listed, listing = 0, f"FOREIGN {type(e).__name__}: {e}"
    allowed[0] = None
    import resource

    print(
        json.dumps(
            {
                "id": "<list>",
                "ops": {"list": listing},
                "listed": listed,
                "violations": list(violations),
                "peak": rss("VmHWM:") - base,
                "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
