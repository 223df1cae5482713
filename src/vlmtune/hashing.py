"""Content hashes shared by the steps (fetch manifests, provenance records, prompt ids)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in ``chunk``-byte blocks. OSError if unreadable."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def ids_digest(ids) -> str:
    """A short, engine-independent fingerprint of a token id sequence (both evaluation engines
    record it per prompt, so their prompts compare without storing the ids)."""
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()[:16]
