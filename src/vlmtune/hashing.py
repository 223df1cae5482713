"""Content hashes shared by the steps (fetch manifests, provenance records)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in ``chunk``-byte blocks. OSError if unreadable."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
