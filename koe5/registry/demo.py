"""A small made-up registry (baseline, trained runs, a sweep, curves, per-query results) for tests and demos.

`python -m koe5.registry.demo PATH [N_EXTRA]` writes one; N_EXTRA adds that many more trained runs through
the API (slow: ~4 writes per run). add_bulk_runs inserts many at once for the leaderboard's 1,000-run render
benchmark. The numbers are random, not results.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import yaml

from koe5.registry.store import Registry

BENCHMARKS = ("ko-strategyqa", "autorag-ko")
FULL_METRICS = [(m, k) for m in ("ndcg", "recall", "precision", "f1", "mrr", "map") for k in (1, 3, 5, 10)]


def spec_yaml(name: str, batch_size: int = 32, lr: float = 2e-5, model: str = "intfloat/multilingual-e5-small") -> str:
    return yaml.safe_dump({"name": name, "model": {"name_or_path": model},
                           "data": {"sources": [{"path": "koe5/assets/ko_sample/train.jsonl"}]},
                           "train": {"batch_size": batch_size, "lr": lr}, "tags": ["demo"]}, sort_keys=False)


def _metrics(rng: random.Random, level: float) -> dict[tuple[str, int], float]:
    return {mk: min(1.0, max(0.0, level + rng.uniform(-0.05, 0.05))) for mk in FULL_METRICS}


def _finish_run(reg: Registry, rng: random.Random, run_id: str, level: float, fingerprint: str = "fp-v1") -> None:
    for bench in BENCHMARKS:
        reg.add_metrics(run_id, bench, _metrics(rng, level), fingerprint=f"{bench}-{fingerprint}",
                        evaluator_version="1")
    reg.set_status(run_id, "finished")


def make_demo_registry(path: str | Path, n_extra: int = 0, seed: int = 0) -> dict[str, str]:
    """Fill a registry at `path`; returns {role: run_id} for the runs tests look up."""
    rng = random.Random(seed)
    path = Path(path)
    reg = Registry(path)
    ids: dict[str, str] = {}

    ids["baseline"] = reg.create_run("e5-small-baseline", "hash-base", spec_yaml("e5-small-baseline"),
                                     kind="baseline", status="running", tags=["baseline"])
    _finish_run(reg, rng, ids["baseline"], 0.45)

    ids["trained"] = reg.create_run("e5-small-ko-ft", "hash-ft", spec_yaml("e5-small-ko-ft", lr=3e-5),
                                    kind="train", status="running", tags=["demo"],
                                    provenance={"git_commit": "0123abc", "git_dirty": False, "host": "node0",
                                                "versions": {"torch": "2.13"}, "devices": ["cpu"], "world_size": 1})
    log = path.parent / f"{ids['trained']}.train.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 2.0 / s, "lr": 3e-5 * min(1, s / 5), "grad_norm": 1.0,
                                       "triples_per_s": 100 + s, "tokens_per_s": 9000.0, "margin": 0.1 * s,
                                       "false_neg_frac": 0.01, "elapsed_s": float(s)}) + "\n" for s in range(1, 21)))
    reg.fold_train_log(ids["trained"], log)
    # Same layout as koe5.eval's per-query files: one per benchmark, a query without relevant documents
    # is `excluded` with no metrics.
    for b, bench in enumerate(BENCHMARKS):
        per_query = path.parent / f"{ids['trained']}.per_query-{bench}.jsonl"
        rows = [{"benchmark": bench, "fingerprint": f"{bench}-fp-v1", "qid": f"q{i}", "excluded": False,
                 "first_relevant_rank": 1 + (i + b) % 4, "ndcg@3": float((i + b) % 3 != 0), "f1@1": float((i + b) % 2)}
                for i in range(12)]
        rows.append({"benchmark": bench, "fingerprint": f"{bench}-fp-v1", "qid": "q-none", "excluded": True,
                     "first_relevant_rank": None})
        per_query.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        reg.add_artifact(ids["trained"], "per_query", str(per_query))
    reg.set_data_mix(ids["trained"], {"ko_sample": 1.0})
    _finish_run(reg, rng, ids["trained"], 0.6)

    sweep = reg.create_sweep("bs-sweep", "experiments/bs.yaml", ["train.batch_size"])
    ids["sweep"] = sweep
    for bs in (16, 32, 64):
        rid = reg.create_run(f"bs-sweep-{bs}", f"hash-bs{bs}", spec_yaml(f"bs-sweep-{bs}", batch_size=bs),
                             status="running", tags=["sweep"], sweep_id=sweep, sweep_values={"train.batch_size": bs})
        _finish_run(reg, rng, rid, 0.5 + bs / 1000)
        ids[f"sweep{bs}"] = rid

    # Evaluated with another version of one benchmark: its numbers there must show as stale.
    ids["stale"] = reg.create_run("e5-old-bench", "hash-old", spec_yaml("e5-old-bench"), status="running")
    _finish_run(reg, rng, ids["stale"], 0.7, fingerprint="fp-v0")

    for i in range(n_extra):
        rid = reg.create_run(f"extra-{i:04d}", f"hash-x{i}", spec_yaml(f"extra-{i:04d}", lr=1e-5 * (1 + i % 5)),
                             status="running", tags=["bulk"])
        _finish_run(reg, rng, rid, rng.uniform(0.3, 0.7))
    return ids


def add_bulk_runs(path: str | Path, n: int, seed: int = 0) -> None:
    """Insert n finished runs with full metrics in one transaction (the API would take one write per call)."""
    import pandas as pd

    from koe5.registry.connect import utcnow, write_connection
    from koe5.registry.store import new_id

    rng = random.Random(seed)
    now = utcnow()
    runs, metrics = [], []
    for i in range(n):
        rid = f"{new_id(now)}{i:05d}"
        runs.append({"run_id": rid, "name": f"bulk-{i:05d}", "kind": "train", "spec_hash": f"bulk-{i}",
                     "spec_yaml": spec_yaml(f"bulk-{i:05d}", lr=1e-5 * (1 + i % 5)), "status": "finished",
                     "created_at": now, "tags": json.dumps(["bulk"])})
        level = rng.uniform(0.3, 0.7)
        for bench in BENCHMARKS:
            for (m, k), v in _metrics(rng, level).items():
                metrics.append({"run_id": rid, "benchmark": bench, "metric": m, "k": k, "value": v,
                                "fingerprint": f"{bench}-fp-v1", "evaluator_version": "1"})
    runs_df, metrics_df = pd.DataFrame(runs), pd.DataFrame(metrics)
    with write_connection(Path(path)) as con:
        con.register("runs_df", runs_df)
        con.register("metrics_df", metrics_df)
        con.execute(f"INSERT INTO runs ({', '.join(runs_df.columns)}) SELECT * FROM runs_df")
        con.execute(f"INSERT INTO metrics ({', '.join(metrics_df.columns)}) SELECT * FROM metrics_df")


if __name__ == "__main__":
    out = make_demo_registry(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    print(json.dumps(out, indent=2))
