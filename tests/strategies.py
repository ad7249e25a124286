"""Hypothesis strategies: random pytrees over every dtype the format stores."""

from __future__ import annotations

import collections

import hypothesis.extra.numpy as hnp
import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from computable_flows_shim._format.dtypes import NAME_TO_DTYPE

ALL_DTYPES = sorted(NAME_TO_DTYPE.values(), key=str)
Pair = collections.namedtuple("Pair", "first second")


@st.composite
def arrays(draw, max_side: int = 5) -> np.ndarray:
    dtype = draw(st.sampled_from(ALL_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=max_side))
    n = int(np.prod(shape)) * dtype.itemsize
    # Random bytes from a drawn seed: drawing n bytes through Hypothesis is very slow for
    # large n, and any bit pattern is a valid value of the dtype (NaN payloads included),
    # except bool (0/1 only) and sub-byte ML types (only the low bits are meaningful).
    seed = draw(st.integers(0, 2**32 - 1))
    a = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    if draw(st.booleans()):  # and plenty of zeros, the most common value in real states
        a[: n // 2] = 0
    if dtype == np.bool_:
        a &= 1
    elif dtype in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4), np.dtype(ml_dtypes.float4_e2m1fn)):
        a &= 0x0F if dtype != np.dtype(ml_dtypes.int4) else 0x07
    elif hasattr(ml_dtypes, "int2") and dtype in (np.dtype(ml_dtypes.int2), np.dtype(ml_dtypes.uint2)):
        a &= 0x01
    elif dtype.name.startswith("float6"):
        a &= 0x1F
    return a.view(dtype).reshape(shape)


keys = st.one_of(st.text(max_size=12), st.sampled_from(["", ".", "..", "a/b", "__x", "%", "x.y", "ключ", "A", "a"]))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.complex_numbers(allow_nan=False),
)

pytrees = st.recursive(
    st.one_of(arrays(), scalars),
    lambda children: st.one_of(
        st.dictionaries(keys, children, max_size=4),
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.tuples(children, children).map(lambda t: Pair(*t)),
    ),
    max_leaves=8,
)


def assert_tree_equal(a, b, path="state"):
    """Bit-exact, type-exact equality of two restored pytrees."""
    assert type(a) is type(b) or (isinstance(a, tuple) and hasattr(a, "_fields")), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length"
        if hasattr(a, "_fields"):
            assert a._fields == b._fields and type(a).__name__ == type(b).__name__, f"{path}: namedtuple"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{path}: bytes differ"
    elif isinstance(a, float):
        assert (a == b) or (a != a and b != b), f"{path}: {a} != {b}"
        assert np.signbit(a) == np.signbit(b), f"{path}: sign of zero"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_lazy_slices_match(lazy, a: np.ndarray) -> None:
    """A lazy leaf reads back whole and under a few row slices exactly as numpy slices ``a``."""
    assert lazy.shape == a.shape and lazy.dtype == a.dtype
    assert np.asarray(lazy).tobytes() == a.tobytes()
    if a.ndim:
        n = a.shape[0]
        for key in [slice(1, None, 2), slice(None, None, -1), slice(n // 2, n // 2 + 1), -1 if n else slice(0)]:
            want, got = a[key], lazy[key]
            assert got.shape == want.shape and got.tobytes() == want.tobytes(), key
