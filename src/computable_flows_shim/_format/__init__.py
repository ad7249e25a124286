"""Formats v1 and v2, whose contract is ``spec/FORMAT.md``: the on-disk names (``spec``), data
types, JSON attributes, the pytree structure, telemetry columns, the compression codecs of v2
(``codecs``), one stored array (``arrays``: layout, metadata, chunk I/O and CRC32C), the I/O
pools and syncs (``io``), and the codec that writes and reads a whole checkpoint group.
Imports nothing above ``errors`` and ``_types``."""
