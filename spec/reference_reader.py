#!/usr/bin/env python3
"""Reference reader for computable-flows-shim checkpoints, format versions 1, 2 and 3.

Written from spec/FORMAT.md alone, with zarr-python doing the Zarr part. It never imports
computable_flows_shim; it needs zarr-python (and numpy and numcodecs, which come with it)
plus ml_dtypes for the extension data types (bfloat16, float8, int4...), which zarr-python
3.1 does not know (FORMAT.md section 9).

zarr-python decodes arrays of the core types and checks each chunk's CRC32C trailer, but a
missing chunk file reads as the fill value and the per-chunk manifest is never looked at
(section 14). So before zarr-python reads an array this reader does steps 1, 2 and 4 of
section 12 itself: every chunk file must exist (not as a symlink), have the right size,
and carry the CRC32C trailer the manifest ``cfs_chunk_crc32c`` lists. (A file replaced
between that check and zarr-python's read is not detected: a reader for hostile
concurrent writers would decode the bytes it checked, as it does here for the extension
types.)  A compressed chunk (version 2, section 8.1: ``zstd`` or ``blosc`` between ``bytes`` and
``crc32c``) is refused unless its frame header states exactly the chunk's size, before anything
decompresses it (zarr-python would allocate whatever the header claims).  A packed leaf
(version 3, section 8.2) is a range of its pack ``packed/<data type>``, an ordinary array read
(once) and checked like any other; the range's CRC32C must then equal the node's ``crc32c``.

Usage::

    python spec/reference_reader.py CHECKPOINT_DIR          # prints the leaves and telemetry
    python spec/reference_reader.py CHECKPOINT_DIR --json   # the same as JSON

    from reference_reader import read_checkpoint
    attrs, state, columns, events = read_checkpoint(path)
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import numcodecs
import numpy as np
import zarr

FORMAT_NAME = "computable-flows-shim.checkpoint"
MAX_VERSION = 3
MAX_METADATA_BYTES = 16 << 20
CORE_TYPES = {
    n: np.dtype(n)
    for n in [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ]
}
EXTENSION_TYPES = [
    "bfloat16",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e4m3b11fnuz",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "float4_e2m1fn",
    "int2",
    "int4",
    "uint2",
    "uint4",
]
KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
PACK_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CRC32C = numcodecs.CRC32C()
BLOSC_CNAMES = ("blosclz", "lz4", "lz4hc", "zlib", "zstd")
BLOSC_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")


class RefusedError(ValueError):
    """The checkpoint is damaged or not something format versions 1 to 3 may read (section 13)."""


def refuse(condition: bool, message: str) -> None:
    if not condition:
        raise RefusedError(message)


def extension_dtype(name: str) -> np.dtype:
    """The numpy type of an extension data type, from ml_dtypes (section 9)."""
    import ml_dtypes

    refuse(name in EXTENSION_TYPES and hasattr(ml_dtypes, name), f"unknown data type {name!r}")
    return np.dtype(getattr(ml_dtypes, name))


def load_json(path: str) -> dict:
    refuse(os.path.isfile(path) and not os.path.islink(path), f"{path}: missing (or a symlink)")
    refuse(os.path.getsize(path) <= MAX_METADATA_BYTES, f"{path}: metadata too large")
    with open(path, "rb") as f:
        try:
            doc = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RefusedError(f"{path}: unreadable metadata ({e})") from None
    refuse(isinstance(doc, dict), f"{path}: not a JSON object")
    return doc


def safe_join(root: str, rel: str) -> str:
    """Section 13, "Paths": a stored path never leaves its group."""
    parts = rel.split("/")
    refuse(
        bool(rel) and not rel.startswith("/") and "\\" not in rel and "\0" not in rel,
        f"unsafe path {rel!r}",
    )
    refuse(all(p not in ("", ".", "..") for p in parts), f"unsafe path {rel!r}")
    path, real = os.path.join(root, *parts), os.path.realpath(root)
    refuse(os.path.commonpath([os.path.realpath(path), real]) == real, f"{rel!r} leaves the checkpoint")
    return path


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_compressor(entry: object, where: str):
    """Section 8.1: the ``zstd`` or ``blosc`` codec of a compressed array, as a numcodecs codec."""
    refuse(isinstance(entry, dict) and isinstance(entry.get("configuration"), dict), f"{where}: bad codec {entry!r}")
    name, conf = entry["name"], entry["configuration"]
    if name == "zstd":
        level, checksum = conf.get("level"), conf.get("checksum", False)
        refuse(set(conf) <= {"level", "checksum"} and is_int(level) and level <= 22, f"{where}: bad zstd {conf}")
        refuse(isinstance(checksum, bool), f"{where}: bad zstd {conf}")
        return numcodecs.Zstd(level=level, checksum=checksum)
    refuse(set(conf) <= {"cname", "clevel", "shuffle", "typesize", "blocksize"}, f"{where}: bad blosc {conf}")
    cname, clevel, shuffle, typesize = conf.get("cname"), conf.get("clevel"), conf.get("shuffle"), conf.get("typesize")
    blocksize = conf.get("blocksize", 0)
    refuse(cname in BLOSC_CNAMES and shuffle in BLOSC_SHUFFLES, f"{where}: bad blosc {conf}")
    refuse(is_int(clevel) and 0 <= clevel <= 9 and is_int(typesize) and 1 <= typesize <= 255, f"{where}: bad blosc")
    refuse(is_int(blocksize) and 0 <= blocksize < 1 << 31, f"{where}: bad blosc {conf}")
    return numcodecs.Blosc(cname, clevel, BLOSC_SHUFFLES.index(shuffle), blocksize, typesize)


def stated_size(codec, body: bytes) -> int | None:
    """Section 8.1: the decoded size a compressed chunk's header states (None: none stated)."""
    if isinstance(codec, numcodecs.Blosc):  # 16-byte header: ..., nbytes at 4, cbytes at 12
        ok = len(body) >= 16 and int.from_bytes(body[12:16], "little") == len(body)
        return int.from_bytes(body[4:8], "little") if ok else None
    if len(body) < 6 or body[:4] != b"\x28\xb5\x2f\xfd":  # a zstd frame (RFC 8878, 3.1.1)
        return None
    fhd = body[4]
    single = (fhd >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
    n = (single, 2, 4, 8)[fhd >> 6]
    if n == 0 or len(body) < pos + n:
        return None
    return int.from_bytes(body[pos : pos + n], "little") + (256 if n == 2 else 0)


def parse_array_metadata(meta: dict, where: str):
    """Section 13, "Array metadata": ``(shape, chunk_shape, separator, data_type, dtype, compressor)``
    (``compressor``: a numcodecs codec, or None)."""
    refuse(meta.get("zarr_format") == 3 and meta.get("node_type") == "array", f"{where}: not a Zarr v3 array")
    shape = meta.get("shape")
    refuse(isinstance(shape, list) and all(is_int(n) and n >= 0 for n in shape), f"{where}: bad shape")
    refuse(len(shape) <= 64 and math.prod(shape) <= 1 << 50, f"{where}: shape too large")
    data_type = meta.get("data_type")
    text = data_type == "string"
    dtype = None if text else CORE_TYPES.get(data_type) or extension_dtype(data_type)
    grid = meta.get("chunk_grid") or {}
    refuse(grid.get("name") == "regular", f"{where}: chunk grid not regular")
    chunk = (grid.get("configuration") or {}).get("chunk_shape")
    refuse(isinstance(chunk, list) and len(chunk) == len(shape), f"{where}: bad chunk_shape")
    refuse(all(is_int(c) and 0 < c <= 1 << 40 for c in chunk), f"{where}: bad chunk_shape")
    cke = meta.get("chunk_key_encoding") or {}
    sep = (cke.get("configuration") or {}).get("separator", "/")
    refuse(cke.get("name") == "default" and sep in (".", "/"), f"{where}: unsupported chunk_key_encoding")
    codecs = meta.get("codecs")
    ok = isinstance(codecs, list) and all(isinstance(c, dict) for c in codecs)
    names = [c.get("name") for c in codecs] if ok else None
    compressor = None
    if not text and names is not None and len(names) == 3 and names[1] in ("zstd", "blosc"):
        names = [names[0], names[2]]
        compressor = parse_compressor(codecs[1], where)  # section 8.1 (format version 2)
    refuse(names == (["vlen-utf8", "crc32c"] if text else ["bytes", "crc32c"]), f"{where}: unsupported codecs")
    if dtype is not None:
        refuse(math.prod(chunk) * dtype.itemsize <= 1 << 32, f"{where}: chunk too large")
        endian = (codecs[0].get("configuration") or {}).get("endian", "little")
        refuse(dtype.itemsize == 1 or endian == "little", f"{where}: not little-endian")
    return shape, chunk, sep, data_type, dtype, compressor


def read_array(root: str, rel: str) -> tuple[np.ndarray, dict]:
    """One array, every chunk checked (section 12); returns ``(values, attributes)``."""
    d = safe_join(root, rel)
    meta = load_json(os.path.join(d, "zarr.json"))
    shape, chunk, sep, data_type, dtype, compressor = parse_array_metadata(meta, d)
    attrs = meta.get("attributes")
    refuse(isinstance(attrs, dict), f"{d}: attributes not an object")
    grid = [math.ceil(n / c) for n, c in zip(shape, chunk)]
    crcs = attrs.get("cfs_chunk_crc32c")
    refuse(isinstance(crcs, list) and len(crcs) == math.prod(grid), f"{d}: bad cfs_chunk_crc32c")
    refuse(all(is_int(c) and 0 <= c < 1 << 32 for c in crcs), f"{d}: bad cfs_chunk_crc32c")
    core = data_type in CORE_TYPES or data_type == "string"
    out = None if core else np.empty(shape, dtype=dtype)
    for crc, coords in zip(crcs, np.ndindex(*grid)):  # C order; () once for a 0-d array
        key = sep.join(["c", *map(str, coords)])
        where = f"{d}, chunk {key}"
        try:  # step 1: a missing file is damage, never the fill value; no symlinks
            fd = os.open(os.path.join(d, *key.split("/")), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise RefusedError(f"{where}: chunk file missing") from None
        except OSError as e:
            raise RefusedError(f"{where}: cannot open chunk file ({e})") from None
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            nbytes = 0 if dtype is None else math.prod(chunk) * dtype.itemsize
            if data_type == "string":  # step 2: the size
                refuse(4 <= size <= 1 << 31, f"{where}: bad text chunk size {size}")
            elif compressor is not None:  # section 8.1: bounded before it is read
                refuse(4 < size <= nbytes + nbytes // 128 + 1024 + 4, f"{where}: bad compressed size {size}")
            else:
                refuse(size == nbytes + 4, f"{where}: truncated or padded ({size} B)")
            if core and compressor is None:  # step 4: the trailer is the manifest's; zarr-python checks step 3
                f.seek(size - 4)
                refuse(int.from_bytes(f.read(4), "little") == crc, f"{where}: not the chunk of the manifest")
                continue
            raw = f.read()
        if compressor is not None:  # the CRC covers the stored bytes, checked first; then the stated size
            refuse(int.from_bytes(raw[-4:], "little") == crc, f"{where}: not the chunk of the manifest")
            try:
                _CRC32C.decode(raw)
            except RuntimeError as e:
                raise RefusedError(f"{where}: {e}") from None
            refuse(stated_size(compressor, raw[:-4]) == nbytes, f"{where}: does not decode to {nbytes} bytes")
            if core:
                continue  # zarr-python decodes it below
        # an extension type: zarr-python cannot decode it, so decode it here (steps 3-5)
        refuse(int.from_bytes(raw[-4:], "little") == crc, f"{where}: not the chunk of the manifest")
        try:
            body = _CRC32C.decode(raw)  # checks the CRC32C trailer
            if compressor is not None:  # into exactly the chunk's size (checked above)
                body = compressor.decode(body, out=np.empty(nbytes, np.uint8))
        except (RuntimeError, ValueError) as e:
            raise RefusedError(f"{where}: {e}") from None
        block = np.frombuffer(body, dtype=dtype).reshape(chunk)
        region = tuple(slice(j * c, min((j + 1) * c, n)) for j, c, n in zip(coords, chunk, shape))
        out[region] = block[tuple(slice(0, s.stop - s.start) for s in region)]  # type: ignore[index]
    if core:
        try:
            out = zarr.open_array(d, mode="r")[...]
        except (ValueError, RuntimeError) as e:  # zarr-python's CRC32C check; an undecodable compressed chunk
            raise RefusedError(f"{d}: {e}") from None
        out = np.asarray(out)
        if data_type == "string":
            out = out.astype(object)
    return out, attrs


def json_float(v: object) -> float:
    if isinstance(v, str):
        refuse(v in ("NaN", "Infinity", "-Infinity"), f"bad float {v!r}")
        return float(v.replace("Infinity", "inf"))
    refuse(isinstance(v, (int, float)) and not isinstance(v, bool), f"bad float {v!r}")
    return float(v)


def packed_leaf(path: str, entry: dict, packs: dict[str, np.ndarray]) -> tuple[np.ndarray, object]:
    """Section 8.2 (version 3): a packed leaf of the checkpoint ``path``, from its node's ``packed``
    member; ``(values, PRNG key implementation or None)``.  ``packs``: each pack read once."""
    refuse(isinstance(entry, dict), f"malformed packed leaf {entry!r}")
    name, offset, shape, crc = (entry.get(k) for k in ("array", "offset", "shape", "crc32c"))
    refuse(isinstance(name, str) and PACK_NAME.fullmatch(name) is not None, f"bad pack name {name!r}")
    refuse(isinstance(shape, list) and len(shape) <= 64, f"bad packed leaf shape {shape!r}")
    refuse(all(is_int(v) and v >= 0 for v in [offset, crc, *shape]), f"bad packed leaf {entry!r}")
    refuse(crc < 1 << 32, f"bad packed leaf crc32c {crc!r}")
    if name not in packs:  # an ordinary array of section 8: every chunk checked
        packs[name] = read_array(os.path.join(path, "packed"), name)[0]
    pack, n = packs[name], math.prod(shape)
    refuse(pack.dtype != object and pack.ndim == 1, f"pack {name!r} is not a 1-D numeric array")
    refuse(0 < n and offset + n <= pack.shape[0], f"packed leaf {shape} at {offset} does not fit pack {name!r}")
    leaf = pack[offset : offset + n]
    got = int.from_bytes(bytes(_CRC32C.encode(leaf.tobytes())[-4:]), "little")  # the codec's trailer
    refuse(got == crc, f"packed leaf at {offset} of pack {name!r} does not match its crc32c ({got} != {crc})")
    return leaf.reshape(shape), entry.get("cfs_prng_key_impl")


def build(node: dict, path: str, packs: dict[str, np.ndarray] | None = None):
    """Section 7: the ``pytree`` attribute of the checkpoint ``path`` back to Python values
    (namedtuple and custom nodes as dicts, PRNG keys as ``("prng_key", impl, key_data)``)."""
    packs = {} if packs is None else packs
    refuse(isinstance(node, dict) and isinstance(node.get("kind"), str), f"malformed pytree node {node!r}")
    kind = node["kind"]
    if kind == "none":
        return None
    if kind == "scalar":
        t, v = node.get("type"), node.get("value")
        if t == "bool" and isinstance(v, bool) or t == "str" and isinstance(v, str) or t == "int" and is_int(v):
            return v
        if t == "float":
            return json_float(v)
        refuse(t == "complex" and isinstance(v, list) and len(v) == 2, f"bad scalar {node!r}")
        return complex(json_float(v[0]), json_float(v[1]))
    if kind == "array":
        refuse(isinstance(node.get("path"), str), "array node without path")
        if "packed" in node:  # version 3: a range of packed/<data type>, nothing under state/
            a, impl = packed_leaf(path, node["packed"], packs)
        else:
            a, attrs = read_array(os.path.join(path, "state"), node["path"])
            impl = attrs.get("cfs_prng_key_impl")
        if impl is not None:
            refuse(impl in KEY_IMPLS, f"unknown PRNG key implementation {impl!r}")
            return ("prng_key", impl, a)  # jax.random.wrap_key_data(a, impl=impl)
        return a[()] if node.get("numpy_scalar") and a.ndim == 0 else a
    children = node.get("children")
    refuse(isinstance(children, list), f"{kind} node without children")
    kids = [build(c, path, packs) for c in children]
    if kind == "list":
        return kids
    if kind == "tuple":
        return tuple(kids)
    refuse(kind in ("dict", "namedtuple", "custom"), f"unknown node kind {kind!r}")
    keys = node.get("keys")
    refuse(isinstance(keys, list) and len(keys) == len(kids), "keys do not match children")
    return dict(zip(keys, kids))


def read_checkpoint(path: str) -> tuple[dict, object, dict[str, np.ndarray], list[dict]]:
    """``(attributes, state, telemetry columns, events)`` of the checkpoint directory ``path``."""
    root = load_json(os.path.join(path, "zarr.json"))
    refuse(root.get("zarr_format") == 3 and root.get("node_type") == "group", "root is not a Zarr v3 group")
    a = root.get("attributes")
    refuse(isinstance(a, dict) and a.get("format") == FORMAT_NAME, f"not a {FORMAT_NAME}")
    version = a.get("format_version")
    refuse(is_int(version) and 1 <= version <= MAX_VERSION, f"format_version {version!r} not readable")
    refuse(isinstance(a.get("run_id"), str) and is_int(a.get("iteration")), "bad run_id or iteration")
    refuse(a.get("checkpoint_id") == os.path.basename(os.path.normpath(path)), "checkpoint_id is not the directory")
    refuse(isinstance(a.get("pytree"), dict), "pytree is not an object")
    state = build(a["pytree"], path)
    tdir = os.path.join(path, "telemetry")
    load_json(os.path.join(tdir, "zarr.json"))
    with os.scandir(tdir) as it:
        names = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    cols = {n: read_array(tdir, n)[0] for n in names}
    for k in ("event_iter", "event_type", "event_payload"):
        refuse(k in cols, f"telemetry: missing {k}")
    events = []
    for i, t, p in zip(cols.pop("event_iter"), cols.pop("event_type"), cols.pop("event_payload")):
        try:
            payload = json.loads(p)
        except json.JSONDecodeError as e:
            raise RefusedError(f"event payload is not JSON ({e})") from None
        events.append({"iter": int(i), "type": str(t), "payload": payload})
    return a, state, cols, events


def leaves(tree: object, prefix: str = "state"):
    """``(name, value)`` for every leaf, in tree order."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}[{k!r}]")
    elif isinstance(tree, (list, tuple)) and not (len(tree) == 3 and tree[0] == "prng_key"):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def describe(value: object) -> dict:
    if isinstance(value, tuple):  # a PRNG key
        return {"prng_key": value[1], "shape": list(value[2].shape), "dtype": str(value[2].dtype)}
    if isinstance(value, (np.ndarray, np.generic)):
        return {"shape": list(np.shape(value)), "dtype": str(np.asarray(value).dtype)}
    return {"value": repr(value)}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    try:
        attrs, state, cols, events = read_checkpoint(args[0])
    except RefusedError as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    report = {
        "checkpoint_id": attrs["checkpoint_id"],
        "run_id": attrs["run_id"],
        "iteration": attrs["iteration"],
        "leaves": {name: describe(v) for name, v in leaves(state)},
        "telemetry": {n: {"length": len(c), "dtype": str(c.dtype)} for n, c in cols.items()},
        "events": [e["type"] for e in events],
    }
    if "--json" in args:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['checkpoint_id']}: run {report['run_id']}, iteration {report['iteration']}")
    for name, d in report["leaves"].items():
        print(f"  {name:<44} {d}")
    for name, d in report["telemetry"].items():
        print(f"  telemetry/{name:<34} {d['length']} x {d['dtype']}")
    print(f"  events: {', '.join(report['events'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
