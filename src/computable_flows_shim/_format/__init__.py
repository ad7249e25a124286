"""Format v1, whose contract is ``spec/FORMAT.md``: the on-disk names (``spec``), data types,
JSON attributes, the pytree structure, telemetry columns, one stored array (``arrays``:
layout, metadata, chunk I/O and CRC32C), the I/O pools and syncs (``io``), and the codec that
writes and reads a whole checkpoint group.  Imports nothing above ``errors`` and ``_types``."""
