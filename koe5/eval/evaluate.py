"""Evaluate an encoder on one benchmark: encode queries and passages, search, score.

The encoder is passed as two callables so this module knows nothing about models, prefixes or
devices: `encode_queries(texts)` and `encode_passages(texts)` return float32 [n, dim] arrays, already
prefixed and (if the model normalizes) L2-normalized. Scores are inner products.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from koe5.eval.benchmark import Benchmark
from koe5.eval.metrics import MetricResult, compute_metrics, rank_documents
from koe5.eval.search import search

Encode = Callable[[list[str]], np.ndarray]


@dataclass
class EvalResult:
    benchmark: str
    fingerprint: str
    metrics: MetricResult
    n_queries: int  # queries in the means (judged queries with a relevant document)
    seconds: dict[str, float]  # phase -> wall seconds: encode_queries, encode_passages, search, metrics
    # qid -> the document ranked first (trec_eval's order), so a miss can show what was retrieved instead
    top_document: dict[str, str] = field(default_factory=dict)
    dim: int | None = None  # the full embedding's width (the metrics above are at this width)
    # Matryoshka evaluation: width -> the metrics with both sides truncated to that many dimensions (truncate)
    at_dims: dict[int, MetricResult] = field(default_factory=dict)


def _encode(fn: Encode, texts: list[str], what: str) -> np.ndarray:
    emb = np.asarray(fn(texts), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"encoding {len(texts)} {what} returned an array of shape {emb.shape}; expected [{len(texts)}, dim]")
    return emb


def truncate(emb: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
    """The first `dim` dimensions of each row, L2-renormalized when the model normalizes: what
    sentence-transformers' `truncate_dim` followed by its normalization gives (a Matryoshka model's
    smaller embedding). A zero row stays zero."""
    out = np.ascontiguousarray(emb[:, :dim], dtype=np.float32)
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.maximum(norms, 1e-12)  # the same floor as torch.nn.functional.normalize
    return out


def _retrieve(q_emb: np.ndarray, p_emb: np.ndarray, benchmark: Benchmark, k: int, index: str) -> dict:
    """{qid: {doc id: score}}: each query's top `k` documents (and any tied at the cut)."""
    hits = search(q_emb, p_emb, k, index=index)
    return {qid: {benchmark.corpus_ids[i]: float(s) for i, s in zip(idx, scores)}
            for qid, (idx, scores) in zip(benchmark.query_ids, hits)}


def evaluate(encode_queries: Encode, encode_passages: Encode, benchmark: Benchmark, ks: Sequence[int],
             index: str = "flat", dims: Sequence[int] = (), normalize: bool = True) -> EvalResult:
    """`index="hnsw"` searches approximately (large corpora); the default is exact, as MTEB is.

    `dims`: also score at these narrower widths (Matryoshka), into `at_dims`, from the same full
    embeddings truncated (`truncate`, renormalized when `normalize`), so nothing is encoded twice; the
    full width itself, or a wider one, is left out (`dim` is the full width)."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = now - clock
        clock = now

    q_emb = _encode(encode_queries, benchmark.query_texts, "queries")
    lap("encode_queries")
    p_emb = _encode(encode_passages, benchmark.corpus_texts, "passages")
    lap("encode_passages")
    run = _retrieve(q_emb, p_emb, benchmark, max(ks), index)
    lap("search")
    metrics = compute_metrics(run, benchmark.qrels, ks)
    lap("metrics")
    full = q_emb.shape[1]
    at_dims = {d: compute_metrics(_retrieve(truncate(q_emb, d, normalize), truncate(p_emb, d, normalize),
                                            benchmark, max(ks), index), benchmark.qrels, ks)
               for d in sorted(set(dims)) if d < full}
    if at_dims:
        lap("truncated_widths")
    return EvalResult(
        benchmark=benchmark.name,
        fingerprint=benchmark.fingerprint,
        metrics=metrics,
        n_queries=metrics.n_queries,
        seconds=seconds,
        top_document={qid: rank_documents(docs)[0] for qid, docs in run.items() if docs},
        dim=full,
        at_dims=at_dims,
    )


# ---- embedding cache ----

def cached(encode: Encode, cache_dir: str, key: dict) -> Encode:
    """Wrap `encode` so its output is kept on disk and reused for the same texts and settings.

    `key` must name everything besides the texts that changes the embeddings: the model's content
    hash, prefix, max length, pooling, normalization, device kind (bf16 on GPU differs from fp32 on CPU), the
    weights' dtype (eval.dtype).
    The texts themselves are hashed at call time, so a changed corpus never hits a stale entry.
    """
    def wrapped(texts: list[str]) -> np.ndarray:
        h = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        for t in texts:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        path = os.path.join(cache_dir, h.hexdigest()[:32] + ".npy")
        if os.path.exists(path):
            emb = np.load(path)
            if emb.shape[0] == len(texts):
                return emb
        emb = np.asarray(encode(texts), dtype=np.float32)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # write then rename: a crash never leaves half a file
        with open(tmp, "wb") as f:
            np.save(f, emb)
        os.replace(tmp, path)
        return emb

    return wrapped


# ---- artifacts ----

def per_query_rows(result: EvalResult) -> list[dict]:
    """One row per query: the rank of its first relevant document, the document ranked first and every
    per-query metric. Queries left out of the means (no relevant document) appear with `excluded` true and
    no metrics."""
    m = result.metrics
    rows = []
    for qid, values in m.per_query.items():
        rows.append({"benchmark": result.benchmark, "fingerprint": result.fingerprint, "qid": qid,
                     "excluded": False, "first_relevant_rank": m.first_relevant_rank.get(qid),
                     "top_document": result.top_document.get(qid), **values})
    for qid in m.excluded:
        rows.append({"benchmark": result.benchmark, "fingerprint": result.fingerprint, "qid": qid,
                     "excluded": True, "first_relevant_rank": None})
    return rows


def write_per_query(result: EvalResult, path: str) -> str:
    """Write per-query results as Parquet (path ending .parquet) or JSON Lines (anything else)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = per_query_rows(result)
    if path.endswith(".parquet"):
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path, index=False)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def mteb_scores(result: EvalResult, hf_subset: str = "default") -> dict:
    """Scores named as MTEB names them (`ndcg_at_10`, fractions), plus koe5's F1 and bookkeeping."""
    scores = {f"{m}_at_{k}": v for (m, k), v in sorted(result.metrics.aggregate.items())}
    main_k = 10 if 10 in result.metrics.ks else max(result.metrics.ks)
    scores["main_score"] = result.metrics.aggregate[("ndcg", main_k)]
    scores["hf_subset"] = hf_subset
    scores["languages"] = ["kor-Hang"]
    return scores


def write_mteb_json(result: EvalResult, directory: str, model_name: str, split: str | None = None) -> str:
    """Write one MTEB result file, `<directory>/<task name>.json`, that `mteb.TaskResult.from_disk` loads.

    A benchmark named after a koe5 preset (`ko-strategyqa`, `autorag`, `publichealthqa`; or the MTEB task
    name itself, e.g. `Ko-StrategyQA`) is written under its MTEB task name, split, subset and dataset
    revision (koe5.eval.presets), so the file sits beside MTEB's own results for that task. Any other
    benchmark keeps koe5's name and records `koe5:<content fingerprint>` as its revision: mteb reads the
    file, but knows no task of that name. `mteb_version` is null: koe5 computed the scores (with trec_eval
    semantics, koe5.eval.metrics), not mteb. koe5's own keys (model_name, dataset_fingerprint, ...) ride
    along; mteb ignores them."""
    from koe5.eval.metrics import EVALUATOR_VERSION
    from koe5.eval.presets import mteb_preset

    preset = mteb_preset(result.benchmark)
    task_name = preset.mteb_task if preset else result.benchmark
    split = split or (preset.split if preset else "test")
    os.makedirs(directory, exist_ok=True)
    doc = {
        "dataset_revision": (preset.revision or "main") if preset else f"koe5:{result.fingerprint}",
        "task_name": task_name,
        "mteb_version": None,
        "evaluation_time": sum(result.seconds.values()),
        "kg_co2_emissions": None,
        "scores": {split: [mteb_scores(result, (preset.subset or "default") if preset else "default")]},
        # koe5's bookkeeping
        "model_name": model_name,
        "benchmark": result.benchmark,  # koe5's name of the benchmark
        "dataset_fingerprint": result.fingerprint,  # koe5's content hash of the benchmark
        "evaluator": EVALUATOR_VERSION,
        "n_queries": result.metrics.n_queries,
        "n_excluded_queries": result.metrics.n_excluded,
    }
    path = os.path.join(directory, f"{task_name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=2)
    return path
