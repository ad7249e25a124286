"""Pytree <-> JSON structure (the ``pytree`` attribute) plus a flat list of leaves.

The structure is plain JSON: node kinds, keys and field names, never a Python
import path and never pickle (spec/FORMAT.md, "The pytree attribute").  Leaves
are addressed by their key path, the same tuple JAX's ``tree_flatten_with_path``
yields, so a ``target`` tree of any registered node type can be matched leaf by
leaf.
"""

from __future__ import annotations

import collections
import hashlib
import keyword
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jax
import numpy as np

from computable_flows_shim._format.dtypes import zarr_name
from computable_flows_shim._types import PyTree
from computable_flows_shim.errors import CheckpointFormatError, TargetMismatchError, UnsupportedLeafError

KeyPath = tuple[Any, ...]


@dataclass
class Leaf:
    """One array leaf to store: where (``path`` under ``state/``) and what."""

    keypath: KeyPath
    path: str
    array: np.ndarray | jax.Array  # a jax.Array only when sharded (see is_sharded)
    node: dict  # its node in the pytree attribute (a packed leaf's place is written into it)
    key_impl: str | None = None


def keystr(keypath: KeyPath) -> str:
    """``state['a'][0]['b']``: how errors name a leaf."""
    return "state" + "".join(f"[{k!r}]" for k in keypath)


def encode_name(key: Any) -> str:
    """A portable, unique Zarr node name for one dict key / attribute / index."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise UnsupportedLeafError(f"unsupported key {key!r} of type {type(key).__name__}")
    if isinstance(key, int):
        return f"%i{key}"
    name = quote(key, safe="")
    if name == "":
        name = "%e"
    elif set(name) == {"."}:
        name = name.replace(".", "%2E")
    elif name.startswith("__"):
        name = "%5F" + name[1:]
    elif name.lower() == "zarr.json":  # would collide with the group's own metadata file
        name = "%" + format(ord(name[0]), "02X") + name[1:]
    if len(name) > 200:
        name = name[:100] + "%h" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return name


def _key_of(entry: Any) -> Any:
    tu = jax.tree_util
    if isinstance(entry, tu.DictKey):
        return entry.key
    if isinstance(entry, tu.SequenceKey):
        return entry.idx
    if isinstance(entry, tu.GetAttrKey):
        return entry.name
    if isinstance(entry, tu.FlattenedIndexKey):
        return entry.key
    raise UnsupportedLeafError(f"unsupported pytree key entry {entry!r}")


def _json_float(x: float) -> object:
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _float_from_json(v: object, where: str) -> float:
    if isinstance(v, str) and v in ("NaN", "Infinity", "-Infinity"):
        return float(v.replace("Infinity", "inf"))
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise CheckpointFormatError(f"{where}: bad float value {v!r}")


def _is_prng_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
"""PRNG implementations the format names (spec/FORMAT.md, "Arrays")."""


def is_sharded(x: Any) -> bool:
    """A ``jax.Array`` spread over several devices or processes: saved shard by shard
    (spec/FORMAT.md, "Arrays"), never gathered into one host array."""
    return isinstance(x, jax.Array) and (not x.is_fully_addressable or len(x.addressable_shards) > 1)


def _leaf_array(x: Any, kp: KeyPath) -> tuple[np.ndarray | jax.Array, str | None]:
    if _is_prng_key(x):
        impl = str(jax.random.key_impl(x))
        if impl not in KEY_IMPLS:
            raise UnsupportedLeafError(f"{keystr(kp)}: PRNG key implementation {impl!r} is not one of {KEY_IMPLS}")
        data = jax.random.key_data(x)
        return (data if is_sharded(data) else np.asarray(data)), impl
    if is_sharded(x):  # kept as it is: written shard by shard (_writer.ShardedData)
        if zarr_name(np.dtype(x.dtype)) is None:
            raise UnsupportedLeafError(
                f"{keystr(kp)}: unsupported dtype {x.dtype} (expected a numeric, bool, complex or ML float dtype)"
            )
        return x, None
    a = np.asarray(x)
    if zarr_name(a.dtype) is None:
        raise UnsupportedLeafError(
            f"{keystr(kp)}: unsupported dtype {a.dtype} (expected a numeric, bool, complex or ML float dtype)"
        )
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a, None


def _children_names(keys: list[Any], kp: KeyPath) -> list[str]:
    """The stored names of a container's children (``encode_name``), unique up to case."""
    try:
        names = [encode_name(k) for k in keys]
    except UnsupportedLeafError as e:  # name the container holding the bad key
        raise UnsupportedLeafError(f"{keystr(kp)}: {e}") from None
    folded = collections.Counter(n.lower() for n in names)
    if len(folded) != len(names):
        # Keys equal up to case would share one file on case-insensitive file
        # systems: make each of those names unique with a hash of its key.
        names = [
            n + "%h" + hashlib.sha256(repr(k).encode()).hexdigest()[:16] if folded[n.lower()] > 1 else n
            for n, k in zip(names, keys)
        ]
    return names


def _scalar_node(x: Any) -> dict | None:
    """The node of ``None`` or a Python scalar; None for anything else."""
    if x is None:
        return {"kind": "none"}
    if isinstance(x, bool):
        return {"kind": "scalar", "type": "bool", "value": bool(x)}
    if isinstance(x, str):
        return {"kind": "scalar", "type": "str", "value": x}
    if isinstance(x, np.generic):
        return None
    if isinstance(x, int):
        return {"kind": "scalar", "type": "int", "value": int(x)}
    if isinstance(x, float):
        return {"kind": "scalar", "type": "float", "value": _json_float(x)}
    if isinstance(x, complex):
        return {"kind": "scalar", "type": "complex", "value": [_json_float(x.real), _json_float(x.imag)]}
    return None


def _custom_children(x: Any, kp: KeyPath) -> tuple[list[Any], list[Any]]:
    """``(keys, children)`` of a registered pytree node, flattened one level."""
    try:
        with warnings.catch_warnings():  # JAX warns that an iterable (a generator...) is a leaf: it is refused here
            warnings.simplefilter("ignore", DeprecationWarning)
            pairs, treedef = jax.tree_util.tree_flatten_with_path(x, is_leaf=lambda y: y is not x)
    except Exception as e:  # noqa: BLE001 - a node type whose flatten fails, or a future JAX refusing it
        raise UnsupportedLeafError(f"{keystr(kp)}: cannot flatten {type(x).__name__} ({e})") from e
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:  # type: ignore[attr-defined]
        raise UnsupportedLeafError(
            f"{keystr(kp)}: unsupported leaf of type {type(x).__name__} "
            "(expected an array, a Python scalar, None, or a registered pytree node)"
        )
    keys = []
    for p, _ in pairs:
        if len(p) != 1:
            raise UnsupportedLeafError(f"{keystr(kp)}: cannot flatten {type(x).__name__} one level")
        keys.append(_key_of(p[0]))
    return keys, [c for _, c in pairs]


def flatten(state: PyTree) -> tuple[dict, list[Leaf]]:
    """The JSON structure of ``state`` and its array leaves, in a fixed order."""
    leaves: list[Leaf] = []

    def walk(x: Any, kp: KeyPath, path: str) -> dict:
        if len(kp) > MAX_DEPTH:
            raise UnsupportedLeafError(f"{keystr(kp[:3])}...: pytree nested deeper than {MAX_DEPTH} levels (a cycle?)")
        scalar = _scalar_node(x)
        if scalar is not None:
            return scalar
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            arr, impl = _leaf_array(x, kp)
            node: dict = {"kind": "array", "path": path or "%root"}
            if isinstance(x, np.generic):
                node["numpy_scalar"] = True
            leaves.append(Leaf(kp, path or "%root", arr, node, impl))
            return node

        def children(keys: list[Any], values: list[Any], names: list[str]) -> list[dict]:
            return [walk(c, kp + (k,), f"{path}/{n}" if path else n) for c, k, n in zip(values, keys, names)]

        if type(x) is dict:
            keys = list(x.keys())
            names = _children_names(keys, kp)
            return {"kind": "dict", "keys": keys, "children": children(keys, list(x.values()), names)}
        if type(x) in (list, tuple):
            idx = list(range(len(x)))
            return {"kind": type(x).__name__, "children": children(idx, list(x), [str(i) for i in idx])}
        if isinstance(x, tuple) and hasattr(type(x), "_fields"):
            fields = list(type(x)._fields)  # type: ignore[attr-defined]
            return {
                "kind": "namedtuple",
                "name": type(x).__name__,
                "keys": fields,
                "children": children(fields, list(x), _children_names(fields, kp)),
            }
        keys, values = _custom_children(x, kp)
        return {
            "kind": "custom",
            "name": type(x).__name__,
            "keys": keys,
            "children": children(keys, values, _children_names(keys, kp)),
        }

    return walk(state, (), ""), leaves


MAX_DEPTH = 100
"""Deepest pytree the format stores (writers refuse deeper trees, readers refuse them too:
the walk is recursive, and a cycle must not exhaust the stack)."""


def iter_leaf_nodes(tree: Any, kp: KeyPath = (), where: str = "pytree"):
    """Yield ``(keypath, node)`` for every array and scalar node, validating shape."""
    if len(kp) > MAX_DEPTH:
        raise CheckpointFormatError(f"{where}: pytree nested deeper than {MAX_DEPTH} levels")
    if not isinstance(tree, dict) or not isinstance(tree.get("kind"), str):
        raise CheckpointFormatError(f"{where}: malformed pytree node at {keystr(kp)}")
    kind = tree["kind"]
    if kind in ("array", "scalar"):
        if kind == "array" and not isinstance(tree.get("path"), str):
            raise CheckpointFormatError(f"{where}: array node without path at {keystr(kp)}")
        yield kp, tree
        return
    if kind == "none":
        return
    children = tree.get("children")
    if kind not in ("dict", "list", "tuple", "namedtuple", "custom") or not isinstance(children, list):
        raise CheckpointFormatError(f"{where}: unknown pytree node kind {kind!r} at {keystr(kp)}")
    if kind in ("list", "tuple"):
        keys: list[Any] = list(range(len(children)))
    else:
        keys = tree.get("keys")  # type: ignore[assignment]
        if not isinstance(keys, list) or len(keys) != len(children):
            raise CheckpointFormatError(f"{where}: keys do not match children at {keystr(kp)}")
        # keys are str or int (not bool), distinct: each names one child (section 7)
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys) or len(
            {(type(k), k) for k in keys}
        ) != len(keys):
            raise CheckpointFormatError(f"{where}: keys must be distinct strings or integers at {keystr(kp)}")
    for k, c in zip(keys, children):
        yield from iter_leaf_nodes(c, kp + (k,), where)


def scalar_value(node: dict, where: str) -> Any:
    t, v = node.get("type"), node.get("value")
    if t == "bool" and isinstance(v, bool):
        return v
    if t == "int" and isinstance(v, int) and not isinstance(v, bool):
        return v
    if t == "str" and isinstance(v, str):
        return v
    if t == "float":
        return _float_from_json(v, where)
    if t == "complex" and isinstance(v, list) and len(v) == 2:
        return complex(_float_from_json(v[0], where), _float_from_json(v[1], where))
    raise CheckpointFormatError(f"{where}: bad scalar node {node!r}")


def _identifier(name: object, fallback: str) -> str:
    if isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name):
        return name
    return fallback


def unflatten(tree: dict, leaf_value) -> PyTree:
    """Rebuild the tree from its JSON; ``leaf_value(keypath, node)`` gives each leaf.

    Custom (registered) nodes come back as dicts of their children: only a
    ``target`` can say which Python type they were (see :func:`restore_into`).
    """

    def build(node: dict, kp: KeyPath) -> Any:
        kind = node["kind"]
        if kind in ("array", "scalar"):
            return leaf_value(kp, node)
        if kind == "none":
            return None
        ch = node["children"]
        if kind == "list":
            return [build(c, kp + (i,)) for i, c in enumerate(ch)]
        if kind == "tuple":
            return tuple(build(c, kp + (i,)) for i, c in enumerate(ch))
        keys = node["keys"]
        values = [build(c, kp + (k,)) for k, c in zip(keys, ch)]
        if kind == "namedtuple":
            cls = collections.namedtuple(  # type: ignore[misc]
                _identifier(node.get("name"), "NamedTuple"), [str(k) for k in keys], rename=True
            )
            return cls(*values)
        return dict(zip(keys, values))

    list(iter_leaf_nodes(tree))  # validate the whole structure before building
    return build(tree, ())


def target_leaves(target: PyTree) -> tuple[list[tuple[KeyPath, Any]], Any]:
    pairs, treedef = jax.tree_util.tree_flatten_with_path(target)
    return [(tuple(_key_of(e) for e in p), leaf) for p, leaf in pairs], treedef


def check_against_target(
    kp: KeyPath, expected: Any, shape: tuple, dtype: np.dtype, key_impl: str | None, checkpoint: str
) -> None:
    """Raise TargetMismatchError unless the stored leaf fits the target leaf."""
    where = f"checkpoint {checkpoint!r}, leaf {keystr(kp)}"
    exp_dtype = getattr(expected, "dtype", None)
    exp_shape = getattr(expected, "shape", None)
    if exp_dtype is None or exp_shape is None:
        if isinstance(expected, (bool, int, float, complex, str)):
            raise TargetMismatchError(f"{where}: target is a Python {type(expected).__name__}, stored an array")
        raise TargetMismatchError(f"{where}: target leaf {type(expected).__name__} has no shape/dtype")
    if jax.dtypes.issubdtype(exp_dtype, jax.dtypes.prng_key):
        if key_impl is None:
            raise TargetMismatchError(f"{where}: expected a PRNG key array, found a {dtype} array")
        found_shape = shape[: len(shape) - len(jax.random.key_data(jax.random.key(0, impl=key_impl)).shape)]
        if tuple(exp_shape) != found_shape:
            raise TargetMismatchError(f"{where}: expected key shape {tuple(exp_shape)}, found {found_shape}")
        return
    if key_impl is not None:
        raise TargetMismatchError(f"{where}: expected {exp_dtype} {tuple(exp_shape)}, found a PRNG key array")
    if tuple(exp_shape) != tuple(shape) or np.dtype(exp_dtype) != dtype.newbyteorder("="):
        raise TargetMismatchError(
            f"{where}: expected shape {tuple(exp_shape)} dtype {np.dtype(exp_dtype)}, "
            f"found shape {tuple(shape)} dtype {dtype.newbyteorder('=')}"
        )


def is_python_scalar(x: Any) -> bool:
    return isinstance(x, (bool, numbers.Number, str)) and not isinstance(x, (np.generic, np.ndarray))
