"""`koe5 data stats SPEC`: what a spec's training data holds and what a run would draw from it.
(`koe5 data bench` is in koe5/data/bench_commands.py.)"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np


def data_stats(spec) -> dict:
    """Read from the token cache (built now if needed), so it costs seconds even for a million triples."""
    from koe5.data.dataset import load_training_data

    data = load_training_data(spec)
    m = spec.model
    out: dict = {"sources": {}, "steps_per_epoch": data.steps_per_epoch}
    for name, src, t in zip(data.names, spec.data.sources, data.sources):
        q = np.asarray(t.queries_len)
        d = np.asarray(t.docs_len)[t.positives_of_rows()]  # each row's first positive
        out["sources"][name] = {
            "examples": t.n_rows, "weight": src.weight, "skipped_lines": t.skipped,
            # Rows the format or holdout left out, and what negative mining kept and rejected, by reason.
            "left_out": t.meta.get("left_out", {}),
            "positives_per_row": float(np.mean(t.rows_npos)),
            "hard_negatives_per_row": float(np.mean(np.diff(t.rows_docs) - t.rows_npos)),
            "query_tokens": _percentiles(q), "document_tokens": _percentiles(d),
            "queries_over_max_len": int((q > m.query_max_len).sum()),
            "documents_over_max_len": int((d > m.passage_max_len).sum()),
            # Duplicates by normalized text (whitespace, Unicode form, case), as duplicate masking sees them.
            "duplicate_queries": t.n_rows - len(np.unique(t.queries_key)),
            "duplicate_documents": t.n_rows - len(np.unique(np.asarray(t.docs_key)[t.positives_of_rows()])),
        }
    drawn: Counter = Counter()
    for step in range(data.steps_per_epoch):
        drawn.update(data.global_batch(step).source.tolist())
    out["one_epoch_draws"] = {data.names[k]: n for k, n in sorted(drawn.items())}
    return out


def _percentiles(lengths: np.ndarray) -> dict:
    p = np.percentile(lengths, [50, 90, 99, 100])
    return {"p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]), "max": int(p[3])}


def cmd_stats(args: argparse.Namespace) -> int:
    from koe5.data.triples import DataError
    from koe5.spec import SpecError, expand

    try:  # a spec meant for a GPU machine is fine here; its data must be readable, though
        spec = expand(args.spec, args.overrides, check_devices=False)[0].spec
        stats = data_stats(spec)
    except (SpecError, DataError) as e:
        print(f"koe5 data stats: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"koe5 data stats: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(stats, ensure_ascii=False, indent=2))
        return 0
    for name, s in stats["sources"].items():
        print(f"{name}: {s['examples']} examples (weight {s['weight']}), drawn per epoch: "
              f"{stats['one_epoch_draws'].get(name, 0)}")
        for kind, plural in (("query", "queries"), ("document", "documents")):
            t, over = s[f"{kind}_tokens"], s[f"{plural}_over_max_len"]
            print(f"  {kind} tokens p50/p90/p99/max: {t['p50']}/{t['p90']}/{t['p99']}/{t['max']}, "
                  f"over max_len: {over}")
        print(f"  duplicate queries: {s['duplicate_queries']}, duplicate documents: {s['duplicate_documents']} "
              f"(normalized text); per row: {s['positives_per_row']:.2f} positives, "
              f"{s['hard_negatives_per_row']:.2f} hard negatives")
        if s["skipped_lines"]:
            print(f"  skipped bad lines (data.on_error=skip): {s['skipped_lines']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="training data: stats, bench")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    s = sub.add_parser("stats", help="per-source counts, token lengths, duplicates and the mix a run draws")
    s.add_argument("spec")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    from koe5.data.bench_commands import register_bench

    register_bench(sub)
