"""`koe5 eval` (evaluate any model and record it as a baseline run) and `koe5 bench` (presets)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from koe5.eval.benchmark import BenchmarkError, load_benchmark
from koe5.eval.evaluate import EvalResult
from koe5.eval.model_eval import (DimError, EncodeSettings, LengthError, default_cache_dir, evaluate_model,
                                  format_table, record_baseline)
from koe5.eval.presets import PRESETS, FetchError, fetch, preset_dir
from koe5.provenance import provenance

# The E5 convention, used when neither the flags nor the model directory give prefixes.
DEFAULT_PREFIXES = {"query": "query: ", "passage": "passage: "}


def fail(message: str) -> int:
    print(f"koe5: error: {message}", file=sys.stderr)
    return 2


def _name_and_path(arg: str) -> tuple[str | None, str]:
    """`NAME=PATH` names a benchmark; a bare path or preset keeps its own name."""
    name, sep, path = arg.partition("=")
    if sep and name and not os.path.exists(arg):
        return name, path
    return None, arg


def parse_dims(text: str | None) -> list[int]:
    """`--dims 64,128` -> [64, 128]; ValueError with a one-line message for anything else."""
    if not text:
        return []
    try:
        dims = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--dims takes comma-separated positive widths, e.g. 64,128; got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"--dims takes comma-separated positive widths, e.g. 64,128; got {text!r}")
    return dims


def cmd_eval(args: argparse.Namespace) -> int:
    try:
        dims = parse_dims(args.dims)
    except ValueError as e:
        return fail(str(e))
    ks = sorted(set(args.k))
    if any(k < 1 for k in ks):
        return fail(f"--k values must be positive integers, got {args.k}")
    if args.nproc < 1:
        return fail(f"--nproc must be 1 or more, got {args.nproc}")
    for flag, value in (("--query-max-len", args.query_max_len), ("--passage-max-len", args.passage_max_len)):
        if value is not None and value < 1:
            return fail(f"{flag} must be a positive number of tokens, got {value}")
    benchmarks = []
    try:
        for arg in args.benchmark:
            name, path = _name_and_path(arg)
            benchmarks.append(load_benchmark(path, name=name))
    except BenchmarkError as e:
        return fail(str(e))
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        return fail(f"two benchmarks share a name ({', '.join(names)}); rename one of the directories")

    try:
        from koe5.encoder import load_encoder

        device = args.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        encoder = load_encoder(args.model, pooling=args.pooling, device=device, dtype=args.dtype)
    except Exception as e:  # hub, file and config errors all come here; show them as one line
        return fail(f"could not load model '{args.model}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
                    "Give a local model directory (a hub id needs network access).")

    saved = getattr(encoder, "prefixes", None) or {}
    prefixes = {
        "query": args.query_prefix if args.query_prefix is not None else saved.get("query", DEFAULT_PREFIXES["query"]),
        "passage": args.passage_prefix if args.passage_prefix is not None
        else saved.get("passage", DEFAULT_PREFIXES["passage"]),
    }

    # Unset lengths are the model's own maximum (koe5/eval/model_eval.py), the same rule koe5-run uses.
    encode = EncodeSettings(prefixes["query"], prefixes["passage"], args.query_max_len, args.passage_max_len,
                            args.batch_size)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    try:
        results, settings = evaluate_model(encoder, args.model, benchmarks, ks, encode,
                                           names=("--query-max-len", "--passage-max-len"), cache_dir=cache_dir,
                                           index=args.index, progress=args.progress, nproc=args.nproc,
                                           dims=dims, dims_name="--dims")
    except (LengthError, DimError) as e:
        return fail(str(e))
    run_id = None
    if not args.no_record:
        try:
            run_id = _record(args, settings, results, device)
        except RecordError as e:
            return fail(f"cannot record the run: {e}")

    if args.json:
        print(json.dumps({
            "run_id": run_id, "settings": settings,
            "results": [{"benchmark": r.benchmark, "fingerprint": r.fingerprint, "n_queries": r.metrics.n_queries,
                         "n_excluded": r.metrics.n_excluded, "seconds": r.seconds,
                         "metrics": {f"{m}@{k}": v for (m, k), v in r.metrics.aggregate.items()},
                         "dim": r.dim,  # the full width; `metrics_at_dims`: each truncated width's (--dims)
                         "metrics_at_dims": {str(d): {f"{m}@{k}": v for (m, k), v in dm.aggregate.items()}
                                             for d, dm in r.at_dims.items()}} for r in results],
        }, ensure_ascii=False, indent=2))
    else:
        print(format_table(results, ks))
        if run_id:
            print(f"recorded baseline run {run_id}")
    return 0


class RecordError(Exception):
    """Recording the run in the registry failed; the message says why."""


def _record(args, settings: dict, results: list[EvalResult], device: str) -> str:
    """Record a finished `baseline` run with its metrics, artifacts, settings and provenance (`device`: where
    it encoded) through the path koe5-run's baselines take; returns the run id."""
    try:
        from koe5.registry import Registry, RegistryError
    except ImportError as e:
        raise RecordError(f"the registry is unavailable ({e}); rerun with --no-record") from None

    name = args.name or f"baseline-{os.path.basename(os.path.normpath(args.model))}"
    try:
        return record_baseline(Registry(args.registry), name, results, settings, args.out, args.model,
                               provenance(args.nproc, device))
    except (RegistryError, OSError) as e:
        raise RecordError(str(e)) from None


def cmd_bench_fetch(args: argparse.Namespace) -> int:
    if args.name not in PRESETS:
        return fail(f"unknown benchmark preset '{args.name}'; known: {', '.join(sorted(PRESETS))}")
    try:
        path = fetch(args.name)
    except FetchError as e:
        return fail(str(e))
    bench = load_benchmark(path, name=args.name)
    print(f"{args.name}: {len(bench.query_ids)} queries, {len(bench.corpus_ids)} passages, "
          f"fingerprint {bench.fingerprint} -> {path}")
    return 0


def cmd_bench_ls(args: argparse.Namespace) -> int:
    for p in PRESETS.values():
        here = "fetched" if os.path.isdir(preset_dir(p.name)) else "not fetched"
        print(f"{p.name:15s} {p.hub_id} (split {p.split}, MTEB {p.mteb_task}) [{here}]")
        print(f"{'':15s} {p.source}" + (f"\n{'':15s} unverified: {p.uncertain}" if p.uncertain else ""))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on benchmarks and record a baseline run")
    p.add_argument("--model", required=True, help="model directory, hub id or builtin:tiny-ko-bert")
    p.add_argument("--benchmark", action="append", required=True, metavar="NAME_OR_PATH",
                   help="BEIR, AutoRAG or Hugging Face directory, or a fetched preset name; NAME=PATH "
                        "names it in results; repeat for several")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 10], help="cut-offs (default: 1 3 5 10)")
    p.add_argument("--query-prefix", help="default: the model directory's, else 'query: '")
    p.add_argument("--passage-prefix", help="default: the model directory's, else 'passage: '")
    p.add_argument("--pooling", choices=["mean", "cls"], help="default: the model directory's, else mean")
    p.add_argument("--query-max-len", type=int, help="tokens, prefix included (default: the model's own maximum)")
    p.add_argument("--passage-max-len", type=int, help="tokens, prefix included (default: the model's own maximum)")
    p.add_argument("--dims", metavar="D1,D2",
                   help="also evaluate at these embedding widths (Matryoshka: the first D dimensions, "
                        "renormalized), each recorded beside the full width, e.g. 64,128")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="the weights' dtype while encoding (as eval.dtype); bf16 is meant for the GPU")
    p.add_argument("--nproc", type=int, default=1,
                   help="encode with this many processes (one per GPU), each taking a slice of the texts")
    p.add_argument("--name", help="run name in the registry (default: baseline-<model>)")
    p.add_argument("--registry", metavar="PATH", help="registry file (default: $KOE5_REGISTRY or registry/koe5.duckdb)")
    p.add_argument("--out", metavar="DIR", help="artifact directory (default: artifacts/<run id> next to the registry)")
    p.add_argument("--no-record", action="store_true", help="print results without recording a run")
    p.add_argument("--index", choices=["flat", "hnsw"], default="flat",
                   help="flat = exact search (MTEB-comparable); hnsw = approximate, for very large corpora")
    p.add_argument("--cache-dir", metavar="DIR", help="embedding cache (default: $KOE5_CACHE/embeddings)")
    p.add_argument("--no-cache", action="store_true", help="always encode; neither read nor write the cache")
    p.add_argument("--progress", action="store_true", help="show encoding progress bars")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_eval)

    bench = subparsers.add_parser("bench", help="benchmark presets: fetch (download one), ls (list them)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="ACTION")
    bsub.required = True
    f = bsub.add_parser("fetch", help="download a preset from the Hugging Face hub")
    f.add_argument("name", help=", ".join(sorted(PRESETS)))
    f.set_defaults(func=cmd_bench_fetch)
    ls = bsub.add_parser("ls", help="list presets and where they come from")
    ls.set_defaults(func=cmd_bench_ls)
