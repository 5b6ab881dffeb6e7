"""koe5.eval.metrics against pytrec_eval (MTEB's engine) and against rankings worked out by hand."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import pytrec_eval  # a dev dependency: a broken install must fail the tests, not skip them

from koe5.eval.metrics import METRICS, compute_metrics, rank_documents


KS = (1, 3, 5, 10)


def random_case(rng: random.Random, n_queries: int):
    """Random qrels and run covering the edge cases trec_eval is picky about."""
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        n_docs = rng.randint(1, 30)
        docs = [f"d{rng.randint(0, 60)}" for _ in range(n_docs)]
        docs = list(dict.fromkeys(docs))
        kind = rng.random()
        judged = rng.sample(docs, rng.randint(0, len(docs))) + [f"never{i}" for i in range(rng.randint(0, 3))]
        if kind < 0.05:
            qrels[qid] = {d: 0 for d in judged} or {"never": 0}  # judgments all 0
        elif kind < 0.08:
            pass  # query only in the run
        else:
            qrels[qid] = {d: rng.choice([-1, 0, 1, 1, 2, 3]) for d in judged}
            if rng.random() < 0.5:  # R > k: many relevant documents, some never retrieved
                qrels[qid].update({f"extra{i}": 1 for i in range(rng.randint(1, 15))})
        n_run = rng.randint(0, len(docs)) if rng.random() < 0.3 else len(docs)  # runs shorter than k
        scores = {}
        base = rng.choice([0.5, 1.0, 0.1])
        for d in docs[:n_run]:
            r = rng.random()
            if r < 0.25:
                scores[d] = base  # exact ties
            elif r < 0.45:
                scores[d] = base + rng.choice([1e-9, -1e-9, 3e-8])  # equal once cast to float32
            else:
                scores[d] = rng.random()
        run[qid] = scores
    return qrels, run


def pytrec_reference(qrels, run, ks):
    """Per-query reference values named like koe5's per_query keys."""
    judged = {q: j for q, j in qrels.items() if any(g >= 1 for g in j.values())}
    measures = {f"ndcg_cut.{','.join(map(str, ks))}", f"P.{','.join(map(str, ks))}",
                f"recall.{','.join(map(str, ks))}", f"map_cut.{','.join(map(str, ks))}"}
    full = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate({q: run.get(q, {}) for q in judged})
    rr = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"})
    out = {}
    for q in judged:
        row = {}
        for k in ks:
            row[f"ndcg@{k}"] = full[q][f"ndcg_cut_{k}"]
            row[f"precision@{k}"] = full[q][f"P_{k}"]
            row[f"recall@{k}"] = full[q][f"recall_{k}"]
            row[f"map@{k}"] = full[q][f"map_cut_{k}"]
            # MRR@k = recip_rank of the run cut to its top k, in trec_eval's order (written out independently).
            order = sorted(run.get(q, {}).items(), key=lambda t: (float(np.float32(t[1])), t[0]), reverse=True)
            top = dict(order[:k])
            row[f"mrr@{k}"] = rr.evaluate({q: top})[q]["recip_rank"] if top else 0.0
        out[q] = row
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_pytrec_eval_per_query(seed):
    rng = random.Random(seed)
    qrels, run = random_case(rng, 1200)
    result = compute_metrics(run, qrels, KS)
    ref = pytrec_reference(qrels, run, KS)
    assert result.n_queries == len(ref) > 1000
    assert set(result.per_query) == set(ref)
    for q, row in ref.items():
        for name, value in row.items():
            assert abs(result.per_query[q][name] - value) <= 1e-12, (q, name, result.per_query[q][name], value)
    # Means are over the judged queries only.
    for k in KS:
        for metric in ("ndcg", "precision", "recall", "map", "mrr"):
            mean = sum(row[f"{metric}@{k}"] for row in ref.values()) / len(ref)
            assert abs(result.aggregate[(metric, k)] - mean) <= 1e-12
    excluded = {q for q in set(qrels) | set(run) if q not in ref}
    assert result.n_excluded == len(excluded) > 0
    assert set(result.excluded) == excluded


def test_float32_near_ties_are_broken_by_doc_id_like_trec_eval():
    # 1.0 + 1e-9 and 1.0 are the same float32, so "b" (larger id) ranks first.
    qrels = {"q": {"a": 1, "c": 1}}
    run = {"q": {"a": 1.0 + 1e-9, "b": 1.0, "c": 0.5}}
    assert rank_documents(run["q"]) == ["b", "a", "c"]
    res = compute_metrics(run, qrels, [1])
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"P.1"}).evaluate(run)["q"]["P_1"]
    assert res.aggregate[("precision", 1)] == ref == 0.0


def test_hand_computed_ranking():
    # Ranking: d1 (grade 2), d2 (0), d3 (1), d4 (unjudged); d5 (grade 1) is never retrieved. R = 3.
    qrels = {"q": {"d1": 2, "d2": 0, "d3": 1, "d5": 1}}
    run = {"q": {"d1": 0.9, "d2": 0.8, "d3": 0.7, "d4": 0.6}}
    res = compute_metrics(run, qrels, [1, 3, 5])
    a = res.aggregate
    assert a[("precision", 1)] == 1.0
    assert a[("recall", 1)] == pytest.approx(1 / 3)
    assert a[("ndcg", 1)] == 1.0  # ideal top-1 is also grade 2
    assert a[("precision", 3)] == pytest.approx(2 / 3)
    assert a[("recall", 3)] == pytest.approx(2 / 3)
    dcg3 = 2 + 1 / math.log2(4)
    idcg3 = 2 + 1 / math.log2(3) + 1 / math.log2(4)
    assert a[("ndcg", 3)] == pytest.approx(dcg3 / idcg3)
    assert a[("map", 3)] == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert a[("mrr", 1)] == 1.0
    assert a[("precision", 5)] == pytest.approx(2 / 5)  # denominator stays k although only 4 were retrieved
    p, r = 2 / 3, 2 / 3
    assert a[("f1", 3)] == pytest.approx(2 * p * r / (p + r))
    assert res.first_relevant_rank == {"q": 1}


def test_f1_comes_from_averaged_precision_and_recall():
    # q1: P@1 = 1, R@1 = 1/4; q2: P@1 = 0, R@1 = 0. Means: P = 1/2, R = 1/8.
    qrels = {"q1": {"a": 1, "b": 1, "c": 1, "d": 1}, "q2": {"x": 1}}
    run = {"q1": {"a": 1.0}, "q2": {"y": 1.0, "x": 0.5}}
    res = compute_metrics(run, qrels, [1])
    assert res.aggregate[("f1", 1)] == pytest.approx(2 * 0.5 * 0.125 / 0.625)
    # The per-query F1 mean differs: q1 = 2*(1*0.25)/1.25 = 0.4, q2 = 0.
    assert res.per_query["q1"]["f1q@1"] == pytest.approx(0.4)
    assert res.aggregate[("mrr", 1)] == pytest.approx(0.5)
    assert res.first_relevant_rank == {"q1": 1, "q2": 2}
    assert set(k for k, _ in res.aggregate) == set(METRICS)


def test_queries_without_relevant_documents_are_excluded():
    qrels = {"good": {"a": 1}, "zeros": {"a": 0}}
    run = {"good": {"a": 1.0}, "zeros": {"a": 1.0}, "unjudged": {"a": 1.0}}
    res = compute_metrics(run, qrels, [1])
    assert res.n_queries == 1 and res.n_excluded == 2
    assert res.aggregate[("precision", 1)] == 1.0


def test_bad_cutoffs_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        compute_metrics({}, {}, [0])
