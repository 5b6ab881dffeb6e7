"""The leakage guard: training text that is also an evaluation query inflates every number it touches."""

from __future__ import annotations

import re
import unicodedata

from koe5.data.triples import Triple

_NOISE = re.compile(r"[\W_]+", re.UNICODE)  # whitespace and punctuation


def normalize(text: str) -> str:
    """Compatibility-normalized, case-folded, without whitespace or punctuation."""
    return _NOISE.sub("", unicodedata.normalize("NFKC", text).casefold())


def find_leaks(triples: list[Triple], benchmarks: list) -> dict[str, dict]:
    """Per benchmark: how many of its queries appear as a training query or document (exactly, or after
    normalization), with a few examples."""
    train_exact = {t.query for t in triples} | {t.document for t in triples}
    train_norm = {normalize(x) for x in train_exact}
    report = {}
    for bench in benchmarks:
        exact = [q for q in bench.query_texts if q in train_exact]
        normalized = [q for q in bench.query_texts if normalize(q) in train_norm]
        report[bench.name] = {"exact": len(exact), "normalized": len(normalized), "examples": normalized[:3]}
    return report
