"""Edit a checkpoint's metadata the way a hostile (or foreign) writer that knows the format
would: with its metadata checksums recomputed, so what refuses the edit is the reader's
deeper check (an unsafe path, an unknown codec...), not the checksum.

A plain edit without :func:`resign` is what damage looks like: the checksums catch it.
"""

from __future__ import annotations

import json
import os

import crc32c

from computable_flows_shim._format import spec as S
from computable_flows_shim._format.root import root_bytes


def load(path: str) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read())


def dump(doc: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(doc, f)


def resign(checkpoint: str) -> None:
    """Recompute ``cfs_metadata_crc32c`` over every zarr.json below ``checkpoint`` (symlinks
    not followed) and rewrite the root with a valid ``cfs_root_crc32c``."""
    root = os.path.join(checkpoint, "zarr.json")
    doc = load(root)
    crcs = {}
    for base, dirs, files in os.walk(checkpoint):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(base, d))]
        if "zarr.json" in files and base != checkpoint:
            p = os.path.join(base, "zarr.json")
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as f:
                    crcs[os.path.relpath(p, checkpoint).replace(os.sep, "/")] = crc32c.crc32c(f.read())
    attrs = dict(doc.get("attributes") or {})
    attrs[S.A_METADATA_CRCS] = crcs
    consolidated = (doc.get("consolidated_metadata") or {}).get("metadata")
    with open(root, "wb") as f:
        f.write(root_bytes(attrs, consolidated))


def edit(checkpoint: str, relpath: str, mutate) -> None:
    """``mutate(doc)`` the zarr.json at ``relpath`` (``""``: the root), then :func:`resign`."""
    path = os.path.join(checkpoint, *[p for p in relpath.split("/") if p], "zarr.json")
    doc = load(path)
    mutate(doc)
    dump(doc, path)
    resign(checkpoint)
