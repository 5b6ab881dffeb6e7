"""Evaluate an `Encoder` on benchmarks and record the results: the one path shared by `koe5-run`
(after training) and `koe5 eval` (baselines)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from koe5.eval.benchmark import Benchmark
from koe5.eval.evaluate import EvalResult, cached, evaluate, write_mteb_json, write_per_query
from koe5.eval.metrics import EVALUATOR_VERSION, METRICS
from koe5.eval.shard import encode_sharded
from koe5.paths import cache_root


@dataclass
class EncodeSettings:
    """Everything besides the weights that changes the embeddings."""
    query_prefix: str
    passage_prefix: str
    query_max_len: int
    passage_max_len: int
    batch_size: int = 64


def default_cache_dir() -> str:
    return str(cache_root() / "embeddings")


def evaluate_encoder(encoder, benchmarks: Sequence[Benchmark], ks: Sequence[int], settings: EncodeSettings, *,
                     cache_dir: str | None = None, index: str = "flat", progress: bool = False,
                     nproc: int = 1) -> list[EvalResult]:
    """Metrics of `encoder` on each benchmark. With `cache_dir`, embeddings are kept on disk keyed by the
    model's content hash and the settings, so re-evaluating the same model never re-encodes. With
    `nproc` > 1 the texts are encoded by that many processes (koe5/eval/shard.py)."""
    s = settings

    def encode(texts, prefix, max_len, what):
        if nproc > 1:
            return encode_sharded(encoder.path, texts, prefix, max_len, nproc=nproc, batch_size=s.batch_size,
                                  pooling=encoder.model.pooling, normalize=encoder.model.normalize)
        return encoder.encode(texts, prefix, max_len, s.batch_size, progress=progress and what)

    def encode_queries(texts):
        return encode(texts, s.query_prefix, s.query_max_len, "queries")

    def encode_passages(texts):
        return encode(texts, s.passage_prefix, s.passage_max_len, "passages")

    if cache_dir:
        common = {"model": encoder.fingerprint, "pooling": encoder.model.pooling,
                  "normalize": encoder.model.normalize, "device": encoder.device.split(":")[0]}
        encode_queries = cached(encode_queries, cache_dir,
                                {**common, "prefix": s.query_prefix, "max_len": s.query_max_len})
        encode_passages = cached(encode_passages, cache_dir,
                                 {**common, "prefix": s.passage_prefix, "max_len": s.passage_max_len})
    return [evaluate(encode_queries, encode_passages, b, ks, index=index) for b in benchmarks]


def record_results(registry, run_id: str, results: Sequence[EvalResult], out_dir: str, model_name: str) -> None:
    """Metrics (with the benchmark fingerprint and evaluator version) and per-query / MTEB artifacts."""
    for r in results:
        registry.add_metrics(run_id, r.benchmark, r.metrics.aggregate, fingerprint=r.fingerprint,
                             evaluator_version=EVALUATOR_VERSION)
        registry.add_artifact(run_id, "per_query",
                              write_per_query(r, os.path.join(out_dir, f"per_query-{r.benchmark}.parquet")))
        registry.add_artifact(run_id, "mteb_json", write_mteb_json(r, os.path.join(out_dir, "mteb"), model_name))


def format_table(results: Sequence[EvalResult], ks: Sequence[int]) -> str:
    """Metric rows x benchmark columns, values x100 with two decimals."""
    header = ["metric"] + [r.benchmark for r in results]
    rows = [[f"{m}@{k}"] + [f"{100 * r.metrics.aggregate[(m, k)]:.2f}" for r in results] for k in ks for m in METRICS]
    rows.append(["queries"] + [str(r.metrics.n_queries) for r in results])
    rows.append(["excluded"] + [str(r.metrics.n_excluded) for r in results])
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    notes = [f"note: {r.benchmark}: {r.metrics.n_excluded} queries without a relevant document are excluded "
             "from the means" for r in results if r.metrics.n_excluded]
    return "\n".join(lines + notes)
