"""What the CLI's commands share."""

from __future__ import annotations

import os


def store_location(root: str) -> str:
    """A store as the CLI shows it: a URL as given, a directory made absolute."""
    return root if "://" in str(root) else os.path.abspath(root)


__all__ = ["store_location"]
