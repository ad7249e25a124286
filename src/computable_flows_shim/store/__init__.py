"""Where checkpoints live and how they commit: the store contract (``_base``), the local
directory backend (``_local``), the object-store backend (``_s3``), tags and disk usage.
Imports the format layer, never the checkpoints layer above it."""
