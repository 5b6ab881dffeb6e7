"""Content identity: the spec hash that says whether two runs are the same experiment.

The hash covers the canonical resolved spec (defaults filled, keys sorted, comments and layout gone),
with every data and benchmark path replaced by a fingerprint of the bytes it points at: moving a file
keeps the hash, changing one byte of it changes the hash. Where a run writes or reports its outputs
(output_dir, registry.path, train.report_to) is not part of the experiment, so it is left out.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path


# Keys that say where results go, not what the experiment is.
LOCATION_KEYS = (("output_dir",), ("registry", "path"), ("train", "report_to"))


def data_paths(data: dict) -> list[tuple[tuple, str]]:
    """((key tokens), path) for every path whose content is part of the experiment."""
    out = []
    for i, s in enumerate(data["data"]["sources"]):
        out.append((("data", "sources", i, "path"), s["path"]))
    for i, b in enumerate(data["eval"]["benchmarks"]):
        out.append((("eval", "benchmarks", i, "path"), b["path"]))
    return out


def fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a directory's files (relative names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
            h.update(_file_digest(f).encode() + b"\0")
    else:
        h.update(_file_digest(path).encode())
    return "sha256:" + h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def spec_hash(data: dict, fingerprints: dict[str, str]) -> str:
    """16 hex chars of sha256 over the canonical JSON of the spec, paths replaced by their fingerprints."""
    canon = copy.deepcopy(data)
    for tokens, path in data_paths(canon):
        node = canon
        for t in tokens[:-1]:
            node = node[t]
        node[tokens[-1]] = fingerprints[path]
    for tokens in LOCATION_KEYS:
        node = canon
        for t in tokens[:-1]:
            node = node[t]
        node.pop(tokens[-1], None)
    text = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
