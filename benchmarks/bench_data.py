"""Time and size koe5's training-data path on 1,000,000 synthetic Korean triples, beside the anchor's.

    PYTHONPATH=. python benchmarks/bench_data.py --model /path/to/multilingual-e5-small   # the issue's numbers
    PYTHONPATH=. python benchmarks/bench_data.py --rows 20000 --json                       # a quick look

Each phase runs in a fresh process, so its peak RSS is its own:
  koe5 first run    load_training_data: read, validate, tokenize every triple into the memory-mapped cache
  koe5 second run   load_training_data + the first global batch collated: what a rerun pays before step 1
  anchor first/second run   what a sentence-transformers user pays before step 1: datasets.load_dataset("json")
                    (its Arrow conversion, then its cache); the anchor tokenizes each batch while training
  per-step data cost  one 512-triple batch: koe5's collate from the cache vs tokenizing the batch's text
                    (the anchor's collator), both with the same tokenizer, as a ratio

Triples are random strings of common Hangul syllables: queries of ~8 words, positives and negatives of
~60 words, so most documents are close to the 256-token limit of the e5 recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SYLLABLES = list("가나다라마바사아자차카타파하고노도로모보소오조초코토포호구누두루무부수우주추쿠투푸후기니디리미비시이지치키티피히"
                 "한국서울대학교사람시간문제경제정치사회문화역사과학기술")


def write_triples(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pool = np.array(SYLLABLES)
    words = np.array(["".join(pool[rng.integers(0, len(pool), size=int(n))]) for n in rng.integers(2, 5, size=20000)])

    def texts(count: int, mean_words: int) -> list[str]:
        lengths = rng.integers(mean_words // 2, mean_words * 3 // 2, size=count)
        picks = rng.integers(0, len(words), size=int(lengths.sum()))
        ends = np.cumsum(lengths)
        return [" ".join(words[picks[a:b]]) for a, b in zip(np.r_[0, ends[:-1]], ends)]

    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, rows, 10000):
            n = min(10000, rows - start)
            for q, d, h in zip(texts(n, 8), texts(n, 60), texts(n, 60)):
                f.write(json.dumps({"query": q, "document": d, "hard_negative": h}, ensure_ascii=False) + "\n")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def spec_for(data: Path, model: str):
    from koe5.spec import expand_text

    text = f"""
name: bench-data
model: {{name_or_path: "{model}", query_max_len: 32, passage_max_len: 256}}
data: {{sources: [{{path: "{data}"}}], hard_negatives: 1}}
train: {{batch_size: 512, max_steps: 10, device: cpu}}
cache: {{chunk_size: 64}}
"""
    return expand_text(text, check_devices=False)[0].spec


def phase(name: str, data: Path, model: str, workdir: Path) -> dict:
    """One measurement, run in this (fresh) process."""
    import torch

    t0 = time.perf_counter()
    if name in ("koe5-first", "koe5-second"):
        from koe5.data.dataset import load_training_data

        data_ = load_training_data(spec_for(data, model))
        batch = data_.global_batch(0)
        data_.collate(batch, torch.device("cpu"))
        return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), "rows": sum(data_.sizes),
                "cache_mib": sum(f.stat().st_size for t in data_.sources for f in t.directory.iterdir()) / 2**20}
    if name.startswith("anchor"):
        os.environ["HF_DATASETS_CACHE"] = str(workdir / "hf-datasets")
        from datasets import load_dataset

        ds = load_dataset("json", data_files=str(data), split="train")
        ds[:512]  # the first batch's rows
        return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), "rows": len(ds)}
    if name == "per-step":
        from koe5.data.dataset import load_tokenizer, load_training_data
        from koe5.inputs import tokenize

        spec = spec_for(data, model)
        data_ = load_training_data(spec)
        tokenizer = load_tokenizer(spec)
        lines = data.open(encoding="utf-8")
        rows = [json.loads(next(lines)) for _ in range(512)]
        m = spec.model
        koe5_s, anchor_s = [], []
        for step in range(5):
            batch = data_.global_batch(step)
            t = time.perf_counter()
            data_.collate(batch, torch.device("cpu"))
            koe5_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            tokenize(tokenizer, [r["query"] for r in rows], m.query_prefix, m.query_max_len)
            tokenize(tokenizer, [r["document"] for r in rows] + [r["hard_negative"] for r in rows],
                     m.passage_prefix, m.passage_max_len)
            anchor_s.append(time.perf_counter() - t)
        return {"koe5_ms": 1000 * float(np.median(koe5_s)), "anchor_ms": 1000 * float(np.median(anchor_s))}
    raise SystemExit(f"unknown phase {name}")


def run_phase(name: str, data: Path, model: str, workdir: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--phase", name, "--data", str(data), "--model", model,
                           "--workdir", str(workdir)], capture_output=True, text=True,
                          env={**os.environ, "KOE5_CACHE": str(workdir / "koe5-cache")})
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--model", default="builtin:tiny-ko-bert", help="whose tokenizer (a model directory or hub id)")
    ap.add_argument("--workdir", type=Path, help="keep the data and caches here (default: a temporary directory)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:
        print(json.dumps(phase(args.phase, args.data, args.model, args.workdir)))
        return 0

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="koe5-bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / f"triples-{args.rows}.jsonl"
    t = time.perf_counter()
    if not data.exists():
        write_triples(data, args.rows)
    results: dict = {"rows": args.rows, "model": args.model, "file_mib": data.stat().st_size / 2**20,
                     "generate_s": time.perf_counter() - t}
    for name in ("koe5-first", "koe5-second", "anchor-first", "anchor-second", "per-step"):
        results[name] = run_phase(name, data, args.model, workdir)
        if not args.json:
            print(f"{name:14s} {json.dumps(results[name])}", flush=True)
    results["per_step_ratio"] = results["per-step"]["anchor_ms"] / results["per-step"]["koe5_ms"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        f, s = results["koe5-first"], results["koe5-second"]
        print(f"\n{args.rows:,} triples ({results['file_mib']:.0f} MiB of JSONL), tokenizer of {args.model}")
        print(f"koe5 first run:  {f['seconds']:.1f} s, peak RSS {f['peak_rss_mib']:.0f} MiB, cache {f['cache_mib']:.0f} MiB")
        print(f"koe5 second run: {s['seconds']:.1f} s to the first batch, peak RSS {s['peak_rss_mib']:.0f} MiB")
        a1, a2 = results["anchor-first"], results["anchor-second"]
        print(f"anchor (datasets json): first {a1['seconds']:.1f} s / {a1['peak_rss_mib']:.0f} MiB, "
              f"second {a2['seconds']:.1f} s / {a2['peak_rss_mib']:.0f} MiB (tokenizes during training)")
        print(f"per-step data cost, 512 triples: koe5 {results['per-step']['koe5_ms']:.1f} ms, anchor "
              f"{results['per-step']['anchor_ms']:.1f} ms ({results['per_step_ratio']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
