"""Inner-product top-k search with faiss: exact by default, HNSW as an option for large corpora.

The metrics break equal float32 scores by document id (trec_eval's rule), but faiss cuts its top k
at an arbitrary member of a tie. So the exact search returns, per query, every document whose score
ties the k-th best, and leaves the ordering to koe5.eval.metrics. The approximate index may miss
true neighbours anyway, so it returns its top k as they come; its numbers are not MTEB-comparable.
"""

from __future__ import annotations

import faiss
import numpy as np

# Extra neighbours fetched beyond k so that a tie at the cut is usually seen in one search.
TIE_MARGIN = 16
INDEXES = ("flat", "hnsw")


def search(queries: np.ndarray, passages: np.ndarray, k: int,
           index: str = "flat") -> list[tuple[np.ndarray, np.ndarray]]:
    """For each query: (passage indices, float32 scores) of the top k, plus (exact search only)
    any passage tied with the k-th."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    passages = np.ascontiguousarray(passages, dtype=np.float32)
    n = passages.shape[0]
    if queries.ndim != 2 or passages.ndim != 2 or queries.shape[1] != passages.shape[1]:
        raise ValueError(f"query embeddings {queries.shape} and passage embeddings {passages.shape} do not match")
    if n == 0:
        raise ValueError("the corpus is empty: nothing to search")
    if index not in INDEXES:
        raise ValueError(f"unknown index '{index}': use one of {', '.join(INDEXES)}")
    k = min(k, n)
    if index == "hnsw":
        return _search_hnsw(queries, passages, k)
    fetch = min(n, k + TIE_MARGIN)
    flat = faiss.IndexFlatIP(passages.shape[1])
    flat.add(passages)
    scores, ids = flat.search(queries, fetch)

    results = []
    for qi in range(queries.shape[0]):
        s, i = scores[qi], ids[qi]
        kth = s[k - 1]
        if fetch < n and s[-1] >= kth:
            # The tie group may run past what we fetched: score this query against the whole corpus.
            s = passages @ queries[qi]
            kth = np.partition(s, n - k)[n - k]
            i = np.flatnonzero(s >= kth)
            s = s[i]
        else:
            keep = s >= kth
            s, i = s[keep], i[keep]
        results.append((i.astype(np.int64), s.astype(np.float32)))
    return results


def _search_hnsw(queries: np.ndarray, passages: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    hnsw = faiss.IndexHNSWFlat(passages.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 200
    hnsw.hnsw.efSearch = max(128, 2 * k)  # wider beam: higher recall for a little more time
    hnsw.add(passages)
    scores, ids = hnsw.search(queries, k)
    return [(i[i >= 0].astype(np.int64), s[i >= 0].astype(np.float32)) for s, i in zip(scores, ids)]
