"""Evaluation: load a benchmark, encode, search exactly, score with trec_eval semantics.

    from koe5.eval.benchmark import load_benchmark     # BEIR / AutoRAG directory or fetched preset
    from koe5.eval.evaluate import evaluate            # encode -> faiss search -> metrics
    from koe5.eval.metrics import compute_metrics      # run + qrels -> MetricResult (MTEB-comparable)
"""
