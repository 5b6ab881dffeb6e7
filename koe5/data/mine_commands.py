"""`koe5 mine`: mine hard negatives for training triples with a model (the work is in koe5/data/mine.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The E5 convention, used when neither the flags nor the model directory give prefixes (as `koe5 eval`).
DEFAULT_PREFIXES = {"query": "query: ", "passage": "passage: "}


def fail(message: str) -> int:
    print(f"koe5 mine: error: {message}", file=sys.stderr)
    return 2


def _check_options(args) -> str | None:
    """The first bad option as a message, before any file or model is touched."""
    from koe5.data.mine import parse_ranks

    try:
        args.rank_range = parse_ranks(args.ranks)
    except ValueError as e:
        return f"--ranks: {e}"
    if args.margin is not None and args.margin_abs is not None:
        return "--margin and --margin-abs exclude each other; give one"
    if args.margin_abs is None and args.margin is None:
        args.margin = 0.95
    if args.margin is not None and not 0 < args.margin <= 1:
        return f"--margin must be in (0, 1] (a fraction of the positive's score), got {args.margin}"
    if args.margin_abs is not None and not 0 <= args.margin_abs < 2:
        return f"--margin-abs must be in [0, 2) (a cosine difference), got {args.margin_abs}"
    for name in ("negatives", "batch_size", "max_len"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be 1 or more, got {getattr(args, name)}"
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        return f"--device must be auto, cpu or cuda[:N], got '{args.device}'"
    return None


def cmd_mine(args: argparse.Namespace) -> int:
    from koe5.data.mine import build_corpus, mine_with_encoder, read_rows, write_jsonl
    from koe5.data.triples import DataError

    start = time.time()
    problem = _check_options(args)
    if problem:
        return fail(problem)
    # Read all the data before loading a model, so a bad line costs milliseconds, not a model load.
    try:
        rows = read_rows(args.data)
        passages = build_corpus(rows, args.corpus)
    except DataError as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"cannot read {e.filename}: {e.strerror}")

    try:
        import torch

        from koe5.encoder import load_encoder

        device = args.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        encoder = load_encoder(args.model, device=device)
    except Exception as e:  # hub, file and config errors all come here; show them as one line
        first = str(e).splitlines()[0].rstrip(".") if str(e) else ""
        return fail(f"could not load model '{args.model}': {type(e).__name__}: {first}. "
                    "Give a local model directory (a hub id needs network access).")
    saved = encoder.prefixes or {}
    qp = args.query_prefix if args.query_prefix is not None else saved.get("query", DEFAULT_PREFIXES["query"])
    pp = args.passage_prefix if args.passage_prefix is not None else saved.get("passage", DEFAULT_PREFIXES["passage"])

    out_rows, stats = mine_with_encoder(encoder, rows, passages, qp, pp, max_len=args.max_len,
                                        batch_size=args.batch_size, progress=not args.no_progress,
                                        ranks=args.rank_range, negatives=args.negatives,
                                        margin=args.margin, margin_abs=args.margin_abs)
    elapsed = time.time() - start
    margin = f"score < {args.margin} x positive" if args.margin_abs is None else f"score < positive - {args.margin_abs}"
    meta = {**stats.as_dict(), "seconds": round(elapsed, 2), "margin_rule": margin, "args": {
        "model": args.model, "data": args.data, "corpus": args.corpus, "out": args.out, "ranks": args.ranks,
        "margin": args.margin, "margin_abs": args.margin_abs, "negatives": args.negatives,
        "query_prefix": qp, "passage_prefix": pp, "max_len": args.max_len, "batch_size": args.batch_size,
        "device": device}}
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(args.out, out_rows)
        Path(args.out + ".meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n",
                                                 encoding="utf-8")
    except OSError as e:
        return fail(f"cannot write {e.filename}: {e.strerror}")

    print(f"rows read: {stats.rows_read} ({stats.queries} distinct queries), corpus: {stats.corpus} passages")
    print(f"rows written: {stats.rows_written} -> {args.out}")
    print(f"rows with fewer than {args.negatives} negatives: {stats.rows_short} "
          f"(left out, none found: {stats.rows_without_negatives})")
    print(f"mean negatives per written row: {stats.mean_negatives:.2f}")
    print(f"ranks {args.rank_range[0]}-{args.rank_range[1]}, margin: {margin}")
    print(f"elapsed: {elapsed:.1f} s (details: {args.out}.meta.json)")
    if not stats.rows_written:
        # Typical of an untrained model, whose scores all crowd together just under the positive's.
        print("koe5 mine: warning: no row got a negative; widen --ranks or loosen the margin "
              "(a --margin closer to 1, or a smaller --margin-abs)", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("mine", help="mine hard negatives for training triples with a model")
    p.add_argument("--model", required=True, help="model directory, hub id or builtin:tiny-ko-bert")
    p.add_argument("--data", required=True, metavar="JSONL", help="training rows: query, document[, hard_negative]")
    p.add_argument("--corpus", action="append", default=[], metavar="FILE",
                   help="extra passages to search besides the positives: JSONL with 'text', or .txt with one "
                        "per line; repeat for several")
    p.add_argument("--out", required=True, metavar="JSONL", help="output rows; counts go to OUT.meta.json")
    p.add_argument("--ranks", default="10-100", metavar="A-B",
                   help="take negatives from these 1-based search ranks (default: 10-100)")
    p.add_argument("--margin", type=float, metavar="R",
                   help="keep a passage only if score < R x the best positive's score (default: 0.95)")
    p.add_argument("--margin-abs", type=float, metavar="M",
                   help="instead of --margin: keep a passage only if score < best positive's score - M")
    p.add_argument("--negatives", type=int, default=8, help="negatives per row (default: 8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--query-prefix", help="default: the model directory's, else 'query: '")
    p.add_argument("--passage-prefix", help="default: the model directory's, else 'passage: '")
    p.add_argument("--max-len", type=int, default=256, help="token limit for queries and passages (default: 256)")
    p.add_argument("--no-progress", action="store_true", help="no embedding progress bars")
    p.set_defaults(func=cmd_mine)
