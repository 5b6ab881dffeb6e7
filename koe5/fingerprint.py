"""Content hashes of model weights, so an evaluation cache entry belongs to exactly one set of weights."""

from __future__ import annotations

import hashlib
from pathlib import Path


def weights_fingerprint(path: str) -> str:
    """Content hash of a model directory's weight files; a hub id hashes its name."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.glob("*") if p.suffix in (".safetensors", ".bin")) if root.is_dir() else []
    if not files:
        h.update(path.encode())
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
