"""Where koe5 keeps what it can rebuild: the demo model, tokenized training data, benchmark embeddings."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$KOE5_CACHE, or ~/.cache/koe5."""
    return Path(os.environ.get("KOE5_CACHE") or Path.home() / ".cache" / "koe5")
