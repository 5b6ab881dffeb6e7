"""Time koe5's evaluation phases on a synthetic Korean corpus, and the embedding cache's effect.

    PYTHONPATH=. python benchmarks/bench_eval.py                 # 100,000 passages, 1,000 queries
    PYTHONPATH=. python benchmarks/bench_eval.py --passages 20000 --json

Passages are random strings of common Hangul syllables; each query is a slice of one passage, which
is its only relevant document. The model is the builtin tiny BERT (CPU by default). The evaluation
runs twice with one cache directory: the first run encodes, the second reads the cached embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from koe5.eval.benchmark import load_benchmark
from koe5.eval.model_eval import EncodeSettings, evaluate_encoder
from koe5.eval.presets import write_beir

SYLLABLES = list("가나다라마바사아자차카타파하고노도로모보소오조초코토포호구누두루무부수우주추쿠투푸후기니디리미비시이지치키티피히한국서울대학교사람시간문제경제정치사회문화역사과학기술")


def synthetic_benchmark(root: str, n_passages: int, n_queries: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 120, size=n_passages)
    pool = np.array(SYLLABLES)
    # Words of 2-4 syllables separated by spaces, so the tokenizer sees word-like units.
    texts = []
    for n in lengths:
        chars = pool[rng.integers(0, len(pool), size=n)]
        cuts = np.cumsum(rng.integers(2, 5, size=n))
        words = [''.join(chars[a:b]) for a, b in zip(np.r_[0, cuts[:-1]], cuts) if a < n]
        texts.append(" ".join(words))
    corpus = [{"_id": f"d{i:06d}", "title": "", "text": t} for i, t in enumerate(texts)]
    targets = rng.choice(n_passages, size=n_queries, replace=False)
    queries = []
    for j, i in enumerate(targets):
        words = texts[i].split()
        start = int(rng.integers(0, max(1, len(words) - 4)))
        queries.append({"_id": f"q{j:05d}", "text": " ".join(words[start:start + 4])})
    qrels = [(f"q{j:05d}", f"d{i:06d}", 1) for j, i in enumerate(targets)]
    write_beir(root, corpus, queries, qrels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--model", default="builtin:tiny-ko-bert")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="the weights' dtype while encoding (eval.dtype; issue 17, lever 6)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from koe5.encoder import load_encoder

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        synthetic_benchmark(os.path.join(tmp, "bench"), args.passages, args.queries)
        bench = load_benchmark(os.path.join(tmp, "bench"), name="synthetic")
        load_s = time.perf_counter() - t0
        encoder = load_encoder(args.model, device=args.device, dtype=args.dtype)
        settings = EncodeSettings("query: ", "passage: ", args.max_len, args.max_len, args.batch_size)

        runs = []
        for attempt in ("cold", "cached"):  # the same code path koe5-run and koe5 eval use
            [result] = evaluate_encoder(encoder, [bench], [1, 3, 5, 10], settings,
                                        cache_dir=os.path.join(tmp, "cache"))
            runs.append({"run": attempt, **{k: round(v, 3) for k, v in result.seconds.items()},
                         "total": round(sum(result.seconds.values()), 3),
                         "ndcg@10": round(result.metrics.aggregate[("ndcg", 10)], 4)})

    report = {"passages": args.passages, "queries": args.queries, "model": args.model, "device": args.device,
              "dtype": encoder.dtype, "param_dtype": str(next(encoder.model.parameters()).dtype),
              "threads": torch.get_num_threads(), "load_and_build_s": round(load_s, 3), "runs": runs}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.passages} passages, {args.queries} queries, {args.model} on {args.device} ({args.dtype}) "
              f"({report['threads']} threads); build+load {load_s:.1f}s")
        cols = ["run", "encode_queries", "encode_passages", "search", "metrics", "total", "ndcg@10"]
        print("  ".join(f"{c:>15s}" for c in cols))
        for r in runs:
            print("  ".join(f"{str(r[c]):>15s}" for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
