"""`koe5 data stats SPEC`: what a spec's training data holds and what a run would draw from it."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np


def data_stats(spec) -> dict:
    from transformers import AutoTokenizer

    from koe5.data.dataset import load_training_data, source_name
    from koe5.model import resolve_model_path

    data = load_training_data(spec)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec.model.name_or_path))
    m = spec.model
    out: dict = {"sources": {}, "steps_per_epoch": data.steps_per_epoch}
    for src, start, size in zip(spec.data.sources, data.offsets, data.sizes):
        name = source_name(src)
        rows = data.triples[start:start + size]  # sources are stored one after another
        q = [len(ids) for ids in tokenizer([m.query_prefix + t.query for t in rows])["input_ids"]]
        d = [len(ids) for ids in tokenizer([m.passage_prefix + t.document for t in rows])["input_ids"]]
        out["sources"][name] = {
            "examples": len(rows), "weight": src.weight,
            "query_tokens": _percentiles(q), "document_tokens": _percentiles(d),
            "queries_over_max_len": int(sum(n > m.query_max_len for n in q)),
            "documents_over_max_len": int(sum(n > m.passage_max_len for n in d)),
            "duplicate_queries": len(rows) - len({t.query for t in rows}),
            "duplicate_documents": len(rows) - len({t.document for t in rows}),
        }
    drawn = Counter(ex.source for step in range(data.steps_per_epoch) for ex in data.global_batch(step))
    out["one_epoch_draws"] = dict(drawn)
    return out


def _percentiles(lengths: list[int]) -> dict:
    p = np.percentile(lengths, [50, 90, 99, 100]) if lengths else [0, 0, 0, 0]
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
        print(f"  duplicate queries: {s['duplicate_queries']}, duplicate documents: {s['duplicate_documents']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="training data: stats")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    s = sub.add_parser("stats", help="per-source counts, token lengths, duplicates and the mix a run draws")
    s.add_argument("spec")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)
