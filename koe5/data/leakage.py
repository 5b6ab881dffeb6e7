"""The leakage guard: training text that is also an evaluation query inflates every number it touches."""

from __future__ import annotations

import re
import unicodedata

import numpy as np

_NOISE = re.compile(r"[\W_]+", re.UNICODE)  # whitespace and punctuation


def normalize(text: str) -> str:
    """Compatibility-normalized, case-folded, without whitespace or punctuation."""
    return _NOISE.sub("", unicodedata.normalize("NFKC", text).casefold())


def find_leaks(data, benchmarks: list) -> dict[str, dict]:
    """Per benchmark: how many of its queries appear as a training query or positive document (exactly, or
    after normalization), with a few examples. The training side is compared by the hashes the token
    cache keeps (koe5/data/tokens.py), so a million triples are checked without reading their text."""
    from koe5.data.triples import exact_hash

    train_exact = np.unique(np.concatenate([t.leak_exact for t in data.sources]))
    train_norm = np.unique(np.concatenate([t.leak_norm for t in data.sources]))
    report = {}
    for bench in benchmarks:
        queries = list(bench.query_texts)
        exact = np.isin(np.array([exact_hash(q) for q in queries], np.int64), train_exact)
        normalized = np.isin(np.array([exact_hash(normalize(q)) for q in queries], np.int64), train_norm)
        report[bench.name] = {"exact": int(exact.sum()), "normalized": int(normalized.sum()),
                              "examples": [q for q, hit in zip(queries, normalized) if hit][:3]}
    return report
