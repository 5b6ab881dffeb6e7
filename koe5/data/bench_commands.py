"""`koe5 data bench SPEC --source NAME --out DIR`: a development benchmark from the held-out side of a source.

A source with `holdout:` is split by unit (koe5/data/holdout.py): training reads `side: train`, and this
command writes the bench side, through the same reader, as a BEIR directory that
`koe5.eval.benchmark.load_benchmark` loads:

    DIR/queries.jsonl   {"_id": "q1", "text": ...}, one per distinct query text, in source order
    DIR/corpus.jsonl    {"_id": "d1", "title": "", "text": ...}: every passage of the side's units, positives and
                        hard negatives alike (squad: all paragraphs of the held-out articles)
    DIR/qrels/test.tsv  query-id, corpus-id, 1 for each of a query's positives
    DIR/meta.json       the source, the split and the counts

Ids are numbered in source order, so the same file and split always give the same benchmark. A bench
query whose text (after the leakage guard's normalization) is also a query or positive on the training
side (the same question under two articles, say) is left out and counted, so the guard finds no leak
between the two sides. Only query -> passage formats (triples, squad) make a retrieval benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from koe5.data.errors import DataError
from koe5.data.formats import RETRIEVAL_FORMATS
from koe5.data.holdout import active, side_of
from koe5.data.leakage import normalize
from koe5.data.triples import as_source, iter_triples


def source_label(source) -> str:
    """A source's name as the data mix shows it (koe5.data.dataset.source_name, without importing torch)."""
    return source.name or Path(source.path).name


def build_bench(source, out: str | Path, side: str = "bench", on_error: str = "error") -> dict:
    """Write the `side` half of `source` (a SourceSpec with a holdout) to `out`; returns the meta dict."""
    source = as_source(source)
    name = source_label(source)
    if source.format not in RETRIEVAL_FORMATS:
        raise DataError(f"source '{name}' has format {source.format}: its rows are sentence pairs, not queries with "
                        f"the passages that answer them; a retrieval benchmark needs format "
                        f"{' or '.join(RETRIEVAL_FORMATS)}")
    h = source.holdout
    if not active(h):
        raise DataError(f"source '{name}' has no holdout (holdout.fraction is 0): a benchmark cut from data the "
                        "model trains on measures nothing; set the source's holdout: {fraction: ..., side: train}")
    skipped: dict | None = {} if on_error == "skip" else None
    notes: dict = {}
    # Read the whole source once (no holdout) and split here, so both sides come from one pass.
    whole = replace(source, holdout=replace(h, fraction=0.0))
    ours, theirs = [], []
    for t in iter_triples(whole, hard_negatives=1, skipped=skipped, notes=notes):
        (ours if side_of(t.unit, h.fraction, h.seed) == side else theirs).append(t)
    if not ours:
        raise DataError(f"source '{name}': no unit fell on the {side} side (holdout.fraction {h.fraction}); "
                        "raise the fraction")

    seen_other_side = {normalize(x) for t in theirs for x in (t.query, *t.positives)} - {""}
    queries: dict[str, str] = {}          # query text -> id
    corpus: dict[str, str] = {}           # passage text -> id
    qrels: dict[str, dict[str, int]] = {}
    dropped = 0
    for t in ours:
        for passage in (*t.positives, *t.hard_negatives):
            corpus.setdefault(passage, f"d{len(corpus) + 1}")
        if normalize(t.query) in seen_other_side:
            dropped += 1
            continue
        qid = queries.setdefault(t.query, f"q{len(queries) + 1}")
        qrels.setdefault(qid, {}).update({corpus[p]: 1 for p in t.positives})

    out = Path(out)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "queries.jsonl", ({"_id": i, "text": q} for q, i in queries.items()))
    _write_jsonl(out / "corpus.jsonl", ({"_id": i, "title": "", "text": p} for p, i in corpus.items()))
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8", newline="") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{g}\n" for q, docs in qrels.items() for d, g in docs.items())
    meta = {
        # The benchmark's own name (the output folder's), which `koe5 eval --benchmark DIR` reports it under.
        "name": out.resolve().name,
        "source": name, "path": str(source.path), "format": source.format, "side": side,
        "holdout": {"fraction": h.fraction, "seed": h.seed}, "queries": len(queries), "corpus": len(corpus),
        "judgments": sum(len(d) for d in qrels.values()), "units": len({t.unit for t in ours}),
        "queries_also_on_the_other_side": dropped,
        "other_side": {"units": len({t.unit for t in theirs}), "triples": len(theirs)},
        "left_out": notes, "skipped_lines": (skipped or {}).get(str(source.path), 0),
    }
    (out / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return meta


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def cmd_bench(args: argparse.Namespace) -> int:
    from koe5.spec import SpecError, expand

    try:
        spec = expand(args.spec, args.overrides, check_devices=False)[0].spec
        sources = {source_label(s): s for s in spec.data.sources}
        if args.source not in sources:
            raise DataError(f"no source named '{args.source}' in {args.spec}; its sources: {', '.join(sources)}")
        meta = build_bench(sources[args.source], args.out, args.side, spec.data.on_error)
    except (SpecError, DataError) as e:
        print(f"koe5 data bench: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"koe5 data bench: cannot read or write {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    h = meta["holdout"]
    print(f"{args.out}: {meta['queries']} queries, {meta['corpus']} passages, {meta['judgments']} judgments from "
          f"{meta['units']} units ({args.side} side of '{args.source}', fraction {h['fraction']}, seed {h['seed']})")
    print(f"  other side: {meta['other_side']['triples']} triples from {meta['other_side']['units']} units; "
          f"queries left out because the other side has them: {meta['queries_also_on_the_other_side']}")
    if meta["left_out"] or meta["skipped_lines"]:
        print(f"  left out by the format: {meta['left_out']}; bad lines skipped: {meta['skipped_lines']}")
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="write the held-out side of a source (its holdout:) as a BEIR benchmark")
    b.add_argument("spec")
    b.add_argument("overrides", nargs="*", metavar="key=value")
    b.add_argument("--source", required=True, metavar="NAME", help="the source's name (or file name)")
    b.add_argument("--out", required=True, metavar="DIR", help="benchmark directory to write")
    b.add_argument("--side", choices=("bench", "train"), default="bench",
                   help="which side of the holdout to write (default: bench)")
    b.set_defaults(func=cmd_bench)
