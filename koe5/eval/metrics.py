"""Retrieval metrics with trec_eval semantics, so koe5's numbers can be compared with MTEB's.

MTEB scores retrieval with pytrec_eval (trec_eval's engine); this module reproduces its definitions
exactly and is cross-checked against it per query in tests/test_eval_metrics.py. The rules:

- Ranking: sort a query's documents by score cast to float32, descending; break ties by document id,
  descending (trec_eval compares scores as C floats and ids with strcmp).
- Relevant means grade >= 1. Only NDCG uses the grade itself (as a linear gain; grades <= 0 gain nothing).
- P@k = hits in the top k / k, even when fewer than k documents were retrieved   (pytrec_eval `P.k`).
- Recall@k = hits in the top k / R, R = all relevant documents of the query        (`recall.k`).
- NDCG@k = DCG@k / ideal DCG@k, discount log2(rank + 1); the ideal ranking sorts every judged
  document with grade > 0 by grade and is cut at k                               (`ndcg_cut.k`).
- MAP@k = sum of P@rank over the relevant documents at ranks <= k, divided by R    (`map_cut.k`).
- MRR@k = 1 / rank of the first relevant document within the top k, else 0        (`recip_rank` on the
  run truncated to k; MTEB computes its MRR@k with its own loop over the top k, which is the same
  number except that MTEB does not break score ties by document id).
- Queries without any relevant document (missing from the qrels, or all grades <= 0) are excluded
  from every mean and counted in `n_excluded`. A judged query missing from the run scores 0.
- F1@k = 2 * mean(P@k) * mean(R@k) / (mean(P@k) + mean(R@k)), from the averages, as the original
  KoE5 leaderboard computed it. The per-query harmonic mean is kept per query as `f1q@k`.

Values are fractions in [0, 1]; tables multiply by 100.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

METRICS = ("ndcg", "recall", "precision", "f1", "mrr", "map")
# Recorded with every stored metric; bump it if a definition above ever changes.
EVALUATOR_VERSION = "koe5-trec-1"


@dataclass
class MetricResult:
    ks: tuple[int, ...]
    aggregate: dict[tuple[str, int], float]  # (metric, k) -> mean over the evaluated queries
    per_query: dict[str, dict[str, float]]  # qid -> {"ndcg@1": ..., "f1q@1": ...}
    first_relevant_rank: dict[str, int | None]  # qid -> 1-based rank within the run, None if absent
    n_queries: int  # queries in the means
    n_excluded: int  # judged or run queries without a relevant document, left out of the means
    excluded: list[str] = field(default_factory=list)


def rank_documents(doc_scores: dict[str, float]) -> list[str]:
    """Document ids in trec_eval order: float32 score descending, then id descending."""
    # Sorting by (score, id) descending in one pass gives exactly that order.
    return sorted(doc_scores, key=lambda d: (np.float32(doc_scores[d]), d), reverse=True)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"cut-offs k must be positive integers, got {list(ks)}")
    return tuple(sorted(set(ks)))


def compute_metrics(
    run: dict[str, dict[str, float]],
    qrels: dict[str, dict[str, int]],
    ks: Sequence[int],
) -> MetricResult:
    """Score a run (qid -> {doc id: score}) against qrels (qid -> {doc id: grade}) at each cut-off k."""
    ks = _check_ks(ks)
    depth = max(ks)

    judged = [q for q in qrels if any(g >= 1 for g in qrels[q].values())]
    excluded = sorted((set(qrels) | set(run)) - set(judged))

    # Lay every query out as rows of a matrix so the metrics are a few array operations:
    # grades[i, j] = grade of the document at rank j + 1 (0 past the end of the run),
    # ideal[i, j] = j-th largest positive grade among the query's judgments.
    n = len(judged)
    grades = np.zeros((n, depth), dtype=np.float64)
    ideal = np.zeros((n, depth), dtype=np.float64)
    n_rel = np.zeros(n, dtype=np.float64)
    first_rank: dict[str, int | None] = {}
    for i, qid in enumerate(judged):
        judgments = qrels[qid]
        ranked = rank_documents(run.get(qid, {}))
        top = [judgments.get(d, 0) for d in ranked[:depth]]
        grades[i, : len(top)] = top
        positive = sorted((g for g in judgments.values() if g > 0), reverse=True)[:depth]
        ideal[i, : len(positive)] = positive
        n_rel[i] = sum(1 for g in judgments.values() if g >= 1)
        first_rank[qid] = next((r + 1 for r, d in enumerate(ranked) if judgments.get(d, 0) >= 1), None)

    ranks = np.arange(1, depth + 1, dtype=np.float64)
    relevant = grades >= 1
    hits = np.cumsum(relevant, axis=1)
    discount = 1.0 / np.log2(ranks + 1.0)
    dcg = np.cumsum(np.maximum(grades, 0.0) * discount, axis=1)
    idcg = np.cumsum(ideal * discount, axis=1)
    ap_sum = np.cumsum(np.where(relevant, hits / ranks, 0.0), axis=1)
    # Rank of the first relevant document within the top `depth`, or depth + 1 when there is none.
    first = np.where(relevant.any(axis=1), relevant.argmax(axis=1) + 1, depth + 1)

    per_metric: dict[tuple[str, int], np.ndarray] = {}
    for k in ks:
        p = hits[:, k - 1] / k
        r = hits[:, k - 1] / n_rel
        per_metric[("ndcg", k)] = dcg[:, k - 1] / idcg[:, k - 1]
        per_metric[("recall", k)] = r
        per_metric[("precision", k)] = p
        per_metric[("mrr", k)] = np.where(first <= k, 1.0 / first, 0.0)
        per_metric[("map", k)] = ap_sum[:, k - 1] / n_rel
        with np.errstate(invalid="ignore", divide="ignore"):
            per_metric[("f1q", k)] = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)

    aggregate: dict[tuple[str, int], float] = {}
    for k in ks:
        for metric in METRICS:
            if metric == "f1":
                p, r = aggregate[("precision", k)], aggregate[("recall", k)]
                aggregate[("f1", k)] = 2 * p * r / (p + r) if p + r > 0 else 0.0
            else:
                aggregate[(metric, k)] = float(per_metric[(metric, k)].mean()) if n else 0.0

    per_query = {
        qid: {f"{m}@{k}": float(v[i]) for (m, k), v in per_metric.items()} for i, qid in enumerate(judged)
    }
    return MetricResult(
        ks=ks,
        aggregate=aggregate,
        per_query=per_query,
        first_relevant_rank=first_rank,
        n_queries=n,
        n_excluded=len(excluded),
        excluded=excluded,
    )
