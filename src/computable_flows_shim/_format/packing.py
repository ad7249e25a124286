"""Packed leaves (spec/FORMAT.md 8.2): small state leaves stored together, one 1-D Zarr array
per data type (``packed/<data type>``, a group beside ``state/``), so that a state of thousands of small leaves
costs a few files instead of a directory and two files per leaf.

Writing: :func:`packable` says which leaves (host arrays of 1 to ``max_bytes`` bytes; the
writer also leaves out those it compresses), :func:`place` gives each an offset in the pack of
its data type (a multiple of :data:`~computable_flows_shim._format.spec.PACK_ALIGNMENT` bytes,
zeros in between) and writes its place into its pytree node; :class:`PackedData` hands out
each pack chunk's bytes without first copying the leaves into one buffer.

Reading is ``stored.PackedLeaf``: a leaf in a pack with the interface of a stored array of one
chunk (the whole leaf), so that every reader (eager, lazy slices, dask, diff, export) reads it
as any other leaf; an eager load reads each pack once and hands out views of it, each 64-byte
aligned (JAX on the CPU adopts them without a copy)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from computable_flows_shim._format import spec as S
from computable_flows_shim._format.arrays import Layout, slab_chunk_shape
from computable_flows_shim._format.dtypes import zarr_name
from computable_flows_shim._format.root import crc32c_of

PACK_MAX_BYTES = 64 << 10
"""Default size up to which a leaf is packed (``CheckpointManager(pack_max_bytes=...)``)."""


def pack_name(dtype: np.dtype) -> str:
    """The pack's array name under ``packed/``: the Zarr data type name."""
    name = zarr_name(dtype)
    assert name is not None
    return name


class PackedData:
    """The content of one pack as the writer sees it: ``pieces`` are ``(element offset, C-order
    array)`` in offset order, zeros elsewhere, ``length`` elements in all."""

    def __init__(self, dtype: np.dtype, pieces: list[tuple[int, np.ndarray]], length: int) -> None:
        self.dtype = dtype
        self.pieces = pieces
        self.length = length
        self._starts = [off for off, _ in pieces]

    itemsize = property(lambda self: self.dtype.itemsize)
    shape = property(lambda self: (self.length,))
    nbytes = property(lambda self: self.length * self.dtype.itemsize)

    def chunk_buffers(self, layout: Layout, coords: tuple[int, ...]) -> list:
        """The bytes of pack chunk ``coords`` (full chunk size: an edge chunk padded with zeros)."""
        (c,) = layout.chunk_shape
        lo, hi = coords[0] * c, min((coords[0] + 1) * c, self.length)
        i = max(0, bisect.bisect_right(self._starts, lo) - 1)
        off, a = self.pieces[i]
        if off <= lo and hi <= off + a.size:  # one piece holds the chunk (an async save's snapshot): no copy
            flat = a.reshape(-1).view(np.uint8)[(lo - off) * self.itemsize : (hi - off) * self.itemsize]
            return [flat.data] + ([bytes((c - (hi - lo)) * self.itemsize)] if hi - lo < c else [])
        out = np.zeros(c * self.itemsize, np.uint8)
        for off, a in self.pieces[i:]:
            if off >= hi:
                break
            flat = a.reshape(-1).view(np.uint8)
            a_lo, a_hi = max(off, lo), min(off + a.size, hi)
            if a_lo < a_hi:
                out[(a_lo - lo) * self.itemsize : (a_hi - lo) * self.itemsize] = flat[
                    (a_lo - off) * self.itemsize : (a_hi - off) * self.itemsize
                ]
        return [out.data]

    def snapshot(self) -> PackedData:
        """The pack as one host buffer (an async save's copy: one copy, not one per leaf)."""
        buf = np.zeros(self.length, self.dtype)
        for off, a in self.pieces:
            buf[off : off + a.size] = a.reshape(-1)
        return PackedData(self.dtype, [(0, buf)], self.length)


@dataclass
class Pack:
    """One pack being planned: its name under ``packed/``, data type and content."""

    name: str
    dtype: np.dtype
    pieces: list[tuple[int, np.ndarray]] = field(default_factory=list)
    length: int = 0

    def add(self, array: np.ndarray) -> int:
        """Place ``array`` at the next aligned offset; return the offset (in elements)."""
        step = max(1, S.PACK_ALIGNMENT // self.dtype.itemsize)
        off = -(-self.length // step) * step
        self.pieces.append((off, array))
        self.length = off + array.size
        return off

    def data(self) -> PackedData:
        return PackedData(self.dtype, self.pieces, self.length)

    def layout(self) -> Layout:
        """Chunks of at most ``TARGET_CHUNK_BYTES``, as equal as can be: the last (edge) chunk,
        stored at full size, pads little."""
        most = slab_chunk_shape((self.length,), self.dtype.itemsize)[0]
        nchunks = -(-self.length // most)
        return Layout((self.length,), self.dtype, (-(-self.length // nchunks),))


def packable(array: Any, max_bytes: int) -> TypeGuard[np.ndarray]:
    """Whether a leaf is packed: a host (numpy) array of 1 to ``max_bytes`` bytes."""
    return isinstance(array, np.ndarray) and 0 < array.nbytes <= max_bytes


def place(packs: dict[str, Pack], node: dict, array: np.ndarray, key_impl: str | None) -> None:
    """Put ``array`` (the leaf of pytree ``node``) into the pack of its data type, and write
    its place into ``node`` (the leaf's CRC32C too: its identity without reading the pack)."""
    a = np.require(array, requirements="C")
    name = pack_name(a.dtype)
    pack = packs.setdefault(name, Pack(name, a.dtype.newbyteorder("<")))
    entry: dict = {
        S.TN_PACK_ARRAY: name,
        S.TN_PACK_OFFSET: pack.add(a),
        S.TN_PACK_SHAPE: list(a.shape),
        S.TN_PACK_CRC32C: crc32c_of(a.reshape(-1).view(np.uint8).data),
    }
    if key_impl:
        entry[S.AA_KEY_IMPL] = key_impl
    node[S.TN_PACKED] = entry


__all__ = ["PACK_MAX_BYTES", "PackedData", "Pack", "packable", "place", "pack_name"]
