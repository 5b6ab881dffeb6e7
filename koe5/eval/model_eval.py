"""Evaluate an `Encoder` on benchmarks and record the results: the one path shared by `koe5-run`
(the trained model and the untrained baseline) and `koe5 eval` (any model as a baseline).

Three steps, each one function, used the same way by both commands:
- `resolve_lengths`: the token lengths evaluation encodes at. Unless the caller sets them, the model's own
  maximum (`koe5.model.model_max_length`), as MTEB evaluates: the training truncation
  (`model.passage_max_len`) is a training-speed choice and understates long-document benchmarks.
- `evaluate_encoder`: encode (through the embedding cache, keyed by the lengths actually used) -> search
  -> metrics, per benchmark.
- `record_evaluation` writes metrics, per-query and MTEB artifacts and `eval_settings.json` (everything
  that determined the numbers) under a run; `record_baseline` first creates that run, kind `baseline`,
  with the evaluation's own identity as its spec hash, never a training spec's: a baseline is no
  training run, so it can never stand in for one when koe5-run decides whether a spec is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from koe5.eval.benchmark import Benchmark
from koe5.eval.evaluate import EvalResult, cached, evaluate, write_mteb_json, write_per_query
from koe5.eval.metrics import EVALUATOR_VERSION, METRICS
from koe5.eval.shard import encode_sharded
from koe5.paths import cache_root


@dataclass
class EncodeSettings:
    """Everything besides the weights that changes the embeddings. A max length of None means the
    model's own maximum; `resolve_lengths` replaces it with the number before anything is encoded."""
    query_prefix: str
    passage_prefix: str
    query_max_len: Optional[int] = None
    passage_max_len: Optional[int] = None
    batch_size: int = 64


class LengthError(ValueError):
    """A requested evaluation length the model cannot take; the message names the setting."""


def model_limit(encoder) -> int:
    """The longest input `encoder`'s backbone accepts (its position table, capped by its tokenizer)."""
    from koe5.model import model_max_length

    return model_max_length(encoder.model.backbone.config, encoder.tokenizer)


def resolve_lengths(settings: EncodeSettings, limit: int, names: tuple[str, str] = (
        "eval.query_max_len", "eval.passage_max_len")) -> EncodeSettings:
    """`settings` with each unset length replaced by `limit` (the model's maximum). A length above the
    limit would index past the position table (a library traceback mid-evaluation), so it is refused here,
    naming the setting (`names`: how the caller's user spells the two lengths)."""
    out = {}
    for field, name in zip(("query_max_len", "passage_max_len"), names):
        value = getattr(settings, field)
        if value is not None and value > limit:
            raise LengthError(f"{name} is {value}, longer than the model's maximum input of {limit} tokens; "
                              f"use at most {limit}, or leave it unset for the model's maximum")
        out[field] = limit if value is None else value
    return dataclasses.replace(settings, **out)


class DimError(ValueError):
    """A requested evaluation width (eval.dims, --dims) wider than the model's embeddings."""


def embedding_width(encoder) -> int:
    """The width of `encoder`'s embeddings: its backbone's hidden size (pooling keeps it)."""
    config = encoder.model.backbone.config
    return getattr(config, "hidden_size", None) or config.d_model


def check_dims(dims: Sequence[int], width: int, name: str = "eval.dims") -> list[int]:
    """The widths to evaluate below the full one, narrowest first. The full width itself may be listed
    (it is evaluated anyway); a wider one raises DimError naming `name`, before anything is encoded."""
    too_wide = sorted(d for d in set(dims) if d > width)
    if too_wide:
        raise DimError(f"{name}: {too_wide} wider than the model's embeddings ({width} dimensions); "
                       f"use widths up to {width}")
    return sorted(d for d in set(dims) if d < width)


def default_cache_dir() -> str:
    return str(cache_root() / "embeddings")


def evaluate_encoder(encoder, benchmarks: Sequence[Benchmark], ks: Sequence[int], settings: EncodeSettings, *,
                     cache_dir: str | None = None, index: str = "flat", progress: bool = False,
                     nproc: int = 1, dims: Sequence[int] = ()) -> list[EvalResult]:
    """Metrics of `encoder` on each benchmark. With `cache_dir`, embeddings are kept on disk keyed by the
    model's content hash and the settings, so re-evaluating the same model never re-encodes. With
    `nproc` > 1 the texts are encoded by that many processes (koe5/eval/shard.py). `dims`: also the
    metrics at these narrower widths (EvalResult.at_dims), from the same full embeddings truncated."""
    dims = check_dims(dims, embedding_width(encoder))
    # Resolved here too, so the cache key below always holds the lengths actually encoded at, never None.
    s = resolve_lengths(settings, model_limit(encoder))

    def encode(texts, prefix, max_len, what):
        if nproc > 1:
            return encode_sharded(encoder.path, texts, prefix, max_len, nproc=nproc, batch_size=s.batch_size,
                                  pooling=encoder.model.pooling, normalize=encoder.model.normalize,
                                  dtype=encoder.dtype)
        return encoder.encode(texts, prefix, max_len, s.batch_size, progress=progress and what)

    def encode_queries(texts):
        return encode(texts, s.query_prefix, s.query_max_len, "queries")

    def encode_passages(texts):
        return encode(texts, s.passage_prefix, s.passage_max_len, "passages")

    if cache_dir:
        common = {"model": encoder.fingerprint, "pooling": encoder.model.pooling,
                  "normalize": encoder.model.normalize, "device": encoder.device.split(":")[0]}
        # bf16 weights give other embeddings than fp32 ones on the same device (eval.dtype). Named only when
        # not fp32, so the embeddings cached before the key existed (all fp32) stay valid.
        if encoder.dtype != "fp32":
            common["dtype"] = encoder.dtype
        encode_queries = cached(encode_queries, cache_dir,
                                {**common, "prefix": s.query_prefix, "max_len": s.query_max_len})
        encode_passages = cached(encode_passages, cache_dir,
                                 {**common, "prefix": s.passage_prefix, "max_len": s.passage_max_len})
    return [evaluate(encode_queries, encode_passages, b, ks, index=index, dims=dims,
                     normalize=encoder.model.normalize) for b in benchmarks]


def evaluate_model(encoder, model_name: str, benchmarks: Sequence[Benchmark], ks: Sequence[int],
                   settings: EncodeSettings, *, names: tuple[str, str] = ("eval.query_max_len", "eval.passage_max_len"),
                   cache_dir: str | None = None, index: str = "flat", progress: bool = False,
                   nproc: int = 1, dims: Sequence[int] = (), dims_name: str = "eval.dims",
                   ) -> tuple[list[EvalResult], dict]:
    """(results, description): the lengths resolved against the model (a bad one raises `LengthError`
    naming `names`), the widths checked against it (`DimError` naming `dims_name`), every benchmark
    evaluated, and what to record with the numbers."""
    settings = resolve_lengths(settings, model_limit(encoder), names)
    dims = check_dims(dims, embedding_width(encoder), dims_name)
    results = evaluate_encoder(encoder, benchmarks, ks, settings, cache_dir=cache_dir, index=index,
                               progress=progress, nproc=nproc, dims=dims)
    return results, describe(encoder, model_name, settings, benchmarks, ks, index, dims)


def describe(encoder, model_name: str, settings: EncodeSettings, benchmarks: Sequence[Benchmark],
             ks: Sequence[int], index: str = "flat", dims: Sequence[int] = ()) -> dict:
    """Everything that determines the numbers: recorded with every evaluation (`eval_settings.json`), and
    a baseline run's spec. `settings` must be resolved (concrete lengths). The truncated widths (`dims`,
    as check_dims returns them) and a dtype other than fp32 are named only when there are some, so an
    evaluation without them keeps the identity it always had, and one with them is a different baseline."""
    description = {
        "model": {"name_or_path": model_name, "fingerprint": encoder.fingerprint, "pooling": encoder.model.pooling,
                  "normalize": encoder.model.normalize, "max_length": model_limit(encoder),
                  "query_prefix": settings.query_prefix, "passage_prefix": settings.passage_prefix,
                  "query_max_len": settings.query_max_len, "passage_max_len": settings.passage_max_len},
        "eval": {"benchmarks": [{"name": b.name, "fingerprint": b.fingerprint} for b in benchmarks],
                 "k": sorted(ks), "index": index, "device": encoder.device.split(":")[0]},
    }
    if encoder.dtype != "fp32":  # likewise: fp32, the default, keeps the identity baselines always had
        description["eval"]["dtype"] = encoder.dtype
    if dims:
        description["eval"]["dims"] = sorted(dims)
    return description


def identity(description: dict) -> str:
    """A baseline's spec hash: 16 hex chars of sha256 over its canonical description (the model's weights
    fingerprint, the benchmarks' content fingerprints, the settings), so the same evaluation has the same
    hash whichever command recorded it."""
    text = json.dumps(description, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def record_evaluation(registry, run_id: str, results: Sequence[EvalResult], description: dict, out_dir: str,
                      model_name: str) -> None:
    """Metrics (with the benchmark fingerprint and evaluator version), per-query / MTEB artifacts, and the
    settings the numbers came from, under `run_id`."""
    os.makedirs(out_dir, exist_ok=True)
    settings_path = os.path.join(out_dir, "eval_settings.json")
    with open(settings_path, "w", encoding="utf-8") as f:
        json.dump(description, f, ensure_ascii=False, indent=2, sort_keys=True)
    registry.add_artifact(run_id, "eval_settings", settings_path)
    for r in results:
        registry.add_metrics(run_id, r.benchmark, r.metrics.aggregate, fingerprint=r.fingerprint,
                             evaluator_version=EVALUATOR_VERSION, model_dim=r.dim)
        for dim, metrics in r.at_dims.items():  # one row set per truncated width (eval.dims)
            registry.add_metrics(run_id, r.benchmark, metrics.aggregate, fingerprint=r.fingerprint,
                                 evaluator_version=EVALUATOR_VERSION, dim=dim, model_dim=r.dim)
        registry.add_artifact(run_id, "per_query",
                              write_per_query(r, os.path.join(out_dir, f"per_query-{r.benchmark}.parquet")))
        registry.add_artifact(run_id, "mteb_json", write_mteb_json(r, os.path.join(out_dir, "mteb"), model_name))


def record_baseline(registry, name: str, results: Sequence[EvalResult], description: dict, out_dir: str | None,
                    model_name: str, provenance: dict, tags: Sequence[str] = (), sweep_id: str | None = None) -> str:
    """Record a finished evaluation as a run of kind `baseline`; returns its id. `out_dir` None puts the
    artifacts in artifacts/<run id> next to the registry file. A failure while recording marks the run
    failed and re-raises."""
    import yaml

    spec_yaml = yaml.safe_dump(description, allow_unicode=True, sort_keys=True)
    run_id = registry.create_run(name, identity(description), spec_yaml, kind="baseline", status="running",
                                 tags=list(tags), sweep_id=sweep_id, provenance=provenance)
    try:
        out = out_dir or os.path.join(os.path.dirname(os.path.abspath(registry.path)), "artifacts", run_id)
        record_evaluation(registry, run_id, results, description, str(out), model_name)
    except Exception as e:
        registry.set_status(run_id, "failed", error=f"{type(e).__name__}: {e}")
        raise
    registry.set_status(run_id, "finished")
    return run_id


EXCLUDED_NOTE = ("excluded: queries whose judgments list no relevant document; they are left out of every "
                 "mean")


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in rows]


def _widths(results: Sequence[EvalResult]) -> list[int | None]:
    """None (the full width) first, then every truncated width any result has, widest first."""
    return [None] + sorted({d for r in results for d in r.at_dims}, reverse=True)


def _at(r: EvalResult, dim: int | None):
    """r's metrics at width `dim` (None: the full width); None when r was not evaluated there."""
    return r.metrics if dim is None else r.at_dims.get(dim)


def _label(m: str, k: int, dim: int | None) -> str:
    return f"{m}@{k}" if dim is None else f"{m}@{k} @{dim}d"


def format_comparison(base: dict[tuple, float], results: Sequence[EvalResult], ks: Sequence[int]) -> str:
    """The one table koe5-run ends with: per benchmark the base model, the trained model and the change,
    every metric x100, at the full width and then at each truncated width (`@64d` rows). `base` is
    {(benchmark, metric, k): fraction} at the full width and {(benchmark, metric, k, dim): fraction} at a
    truncated one, as the registry holds the baseline run (get_run's metrics and dim_metrics)."""
    top = ["metric (x100)"] + [x for r in results for x in (r.benchmark, "", "")]
    header = [""] + ["base", "trained", "change"] * len(results)
    rows = []
    for dim in _widths(results):
        for k in ks:
            for m in METRICS:
                row = [_label(m, k, dim)]
                for r in results:
                    metrics = _at(r, dim)
                    if metrics is None:
                        row += ["-", "-", "-"]
                        continue
                    new = 100 * metrics.aggregate[(m, k)]
                    old = base.get((r.benchmark, m, k) if dim is None else (r.benchmark, m, k, dim))
                    row += ["-", f"{new:.2f}", "-"] if old is None else [f"{100 * old:.2f}", f"{new:.2f}",
                                                                          f"{new - 100 * old:+.2f}"]
                rows.append(row)
    rows.append(["queries"] + [x for r in results for x in ("", str(r.metrics.n_queries), "")])
    excluded = any(r.metrics.n_excluded for r in results)
    if excluded:
        rows.append(["excluded"] + [x for r in results for x in ("", str(r.metrics.n_excluded), "")])
    return "\n".join(_aligned([top, header] + rows) + ([EXCLUDED_NOTE] if excluded else []))


def format_table(results: Sequence[EvalResult], ks: Sequence[int]) -> str:
    """Metric rows x benchmark columns, values x100 with two decimals; the full width, then each truncated
    width's rows (`ndcg@10 @64d`)."""
    header = ["metric (x100)"] + [r.benchmark for r in results]
    rows = [[_label(m, k, dim)] + ["-" if _at(r, dim) is None else f"{100 * _at(r, dim).aggregate[(m, k)]:.2f}"
                                   for r in results]
            for dim in _widths(results) for k in ks for m in METRICS]
    rows.append(["queries"] + [str(r.metrics.n_queries) for r in results])
    excluded = any(r.metrics.n_excluded for r in results)
    if excluded:
        rows.append(["excluded"] + [str(r.metrics.n_excluded) for r in results])
    return "\n".join(_aligned([header] + rows) + ([EXCLUDED_NOTE] if excluded else []))
