"""The spec's evaluation of a model: the exported model after training, recorded under the training run,
and the untrained model (`eval.baseline`), recorded as its own `baseline` run. Both go through
koe5/eval/model_eval.py, the recording path `koe5 eval` takes too, so a number means the same thing
whichever command recorded it: same lengths rule (eval.*_max_len, else the model's own maximum), same
cache key, same artifacts (metrics, per-query, MTEB JSON, eval_settings.json)."""

from __future__ import annotations

from pathlib import Path

from koe5.provenance import provenance


def encode_settings(spec):
    """The spec's evaluation settings; unset lengths stay None (the model's maximum, resolved per model)."""
    from koe5.eval.model_eval import EncodeSettings

    m, e = spec.model, spec.eval
    return EncodeSettings(m.query_prefix, m.passage_prefix, e.query_max_len, e.passage_max_len, e.batch_size)


def eval_dims(spec) -> list[int]:
    """The truncated widths the spec evaluates at besides the full one: eval.dims, else (null) the widths
    the Matryoshka loss trained (loss.matryoshka_dims), else none."""
    dims = spec.eval.dims if spec.eval.dims is not None else spec.loss.matryoshka_dims
    return list(dims or [])


def _load(spec, model_path: str):
    import torch

    from koe5.encoder import load_encoder
    from koe5.eval.benchmark import load_benchmark

    device = "cuda" if torch.cuda.is_available() and spec.train.device != "cpu" else "cpu"
    encoder = load_encoder(model_path, pooling=spec.model.pooling, normalize=spec.model.normalize, device=device,
                           dtype=spec.eval.dtype)
    return encoder, [load_benchmark(b.path, name=b.name) for b in spec.eval.benchmarks]


def evaluate_trained(registry, run_id: str, model_path: str, spec, out_dir: Path,
                     baseline_id: str | None = None) -> list:
    """Evaluate `model_path` on every benchmark of the spec and record the metrics under `run_id`; print
    them against the baseline run `baseline_id` (the base model) when there is one."""
    from koe5.eval.model_eval import (default_cache_dir, evaluate_model, format_comparison, format_table,
                                      record_evaluation)

    if not spec.eval.benchmarks:
        return []
    encoder, benchmarks = _load(spec, model_path)
    # A run launched with several processes encodes with as many; the search and metrics stay here.
    results, description = evaluate_model(encoder, model_path, benchmarks, spec.eval.k, encode_settings(spec),
                                           cache_dir=default_cache_dir(), progress=True,
                                           nproc=spec.launch.nproc_per_node, dims=eval_dims(spec))
    record_evaluation(registry, run_id, results, description, str(out_dir), model_path)
    if baseline_id:
        base_run = registry.get_run(baseline_id)
        # Full width under (benchmark, metric, k), each truncated width under (..., dim): never mixed.
        base = {(m["benchmark"], m["metric"], m["k"]): m["value"] for m in base_run["metrics"]}
        base.update({(m["benchmark"], m["metric"], m["k"], m["dim"]): m["value"] for m in base_run["dim_metrics"]})
        print(f"\nthe trained model against the base model (baseline run {baseline_id}):")
        print(format_comparison(base, results, spec.eval.k))
    else:
        print(format_table(results, spec.eval.k))
    return results


def evaluate_baseline(rs, registry, sweep_id: str | None, out_dir: Path) -> str:
    """Evaluate the untrained model and record it as a run of kind `baseline`, beside the trained one; an
    identical evaluation already recorded (same weights, benchmarks and settings: the same identity) is
    reused instead of being run again. Returns the baseline's run id."""
    from koe5.eval.model_eval import (check_dims, default_cache_dir, describe, embedding_width, evaluate_encoder,
                                      identity, model_limit, record_baseline, resolve_lengths)

    spec = rs.spec
    model = spec.model.name_or_path
    encoder, benchmarks = _load(spec, model)
    settings = resolve_lengths(encode_settings(spec), model_limit(encoder))
    # The same widths as the trained model, so base and trained compare per width.
    dims = check_dims(eval_dims(spec), embedding_width(encoder))
    description = describe(encoder, model, settings, benchmarks, spec.eval.k, dims=dims)
    done = [r for r in registry.find_runs(identity(description), status="finished") if r["kind"] == "baseline"]
    if done:
        print(f"baseline: the untrained model {model} was already evaluated with these settings as run "
              f"{done[-1]['run_id']}; not evaluating it again")
        return done[-1]["run_id"]
    print(f"baseline: evaluating the untrained model {model}")
    results = evaluate_encoder(encoder, benchmarks, spec.eval.k, settings, cache_dir=default_cache_dir(),
                               progress=True, nproc=spec.launch.nproc_per_node, dims=dims)
    run_id = record_baseline(registry, f"{spec.name}@init", results, description, str(out_dir), model,
                             provenance(1, encoder.device.split(":")[0]), tags=[*spec.tags, "init"],
                             sweep_id=sweep_id)
    # Its full table comes after training, beside the trained model's; here only the headline.
    k = max(spec.eval.k)
    print(f"baseline {run_id}: recorded (ndcg@{k} x100: "
          + ", ".join(f"{r.benchmark} {100 * r.metrics.aggregate[('ndcg', k)]:.2f}" for r in results) + ")")
    return run_id


def update_model_card(model_dir: Path, spec, spec_yaml: str, run_dir: Path, results: list) -> None:
    """Rewrite the exported model's README.md with the evaluation results table."""
    import json

    from koe5.eval.model_eval import format_table
    from koe5.export import model_card

    def read(path: Path) -> dict:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    summary = read(run_dir / "train_summary.json")
    card = model_card(spec=spec, spec_yaml=spec_yaml, data_mix=read(run_dir / "data_mix.json"),
                      steps=summary.get("steps"), world_size=summary.get("world_size"),
                      max_seq_length=read(model_dir / "sentence_bert_config.json").get("max_seq_length"),
                      results_table="```\n" + format_table(results, spec.eval.k) + "\n```")
    (model_dir / "README.md").write_text(card, encoding="utf-8")
