"""Smoke run of the training benchmark on CPU (tiny shape, one timed step): it runs koe5's real step and
the sentence-transformers baseline and reports well-formed measurements. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "train.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--steps", "1", "--batch", "8",
                           "--chunk", "4", "--encode", "64", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    train = {r["variant"]: r for r in rows if r["measure"] == "train_step"}
    assert set(train) == {"koe5", "st-cached-mnrl"}
    for r in train.values():
        assert r["triples_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mem_gib"] > 0
        assert r["final_loss"] == r["final_loss"]  # not NaN
    assert any(r["measure"] == "encode" and r["passages_per_s"] > 0 for r in rows)
    assert "koe5 / st-cached-mnrl" in proc.stdout


def test_bench_train_spec_override_reaches_koe5s_step(tmp_path):
    out = tmp_path / "train.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--steps", "1", "--batch", "8",
                           "--chunk", "4", "--variants", "koe5", "--set", "cache.chunk_tokens=256",
                           "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines() if '"train_step"' in line]
    assert row["overrides"] == ["cache.chunk_tokens=256"] and row["triples_per_s"] > 0
    # ... and it is the step's configuration, not only a label on the row
    import importlib.util

    from koe5.train.trainer import step_config

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks/bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = step_config(bench.bench_spec(tmp_path, 8, 4, "cpu", "fp32", ["cache.chunk_tokens=256"]))
    assert cfg.chunk_tokens == 256 and cfg.chunk_size == 4


def test_bench_train_rejects_a_bad_override_before_building_models():
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--set", "cache.chunk_tokenz=256"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "cache.chunk_tokenz" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_train_attention_flag_runs_koe5s_step_unpadded(tmp_path):
    """--attention varlen (issue 17, lever 5) reaches the trained module (on the CPU its reference attention)."""
    out = tmp_path / "train.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--steps", "1", "--batch", "8",
                           "--chunk", "4", "--variants", "koe5", "--attention", "varlen", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines() if '"train_step"' in line]
    assert row["overrides"] == ["model.attention=varlen"] and row["attention"] == "varlen"
    assert row["triples_per_s"] > 0 and row["final_loss"] == row["final_loss"]


def test_bench_train_issue_17_lever_flags_reach_koe5s_step(tmp_path):
    """--prefetch (the input path through koe5/data/prefetch.py), --no-host-lengths and train.compile (here
    with the aot_eager backend, see tests/test_compile.py) run and are recorded on the row, as
    benchmarks/device/levers.sh switches them."""
    import os

    out = tmp_path / "train.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--steps", "2", "--batch", "8",
                           "--chunk", "4", "--variants", "koe5", "--prefetch", "1", "--no-host-lengths",
                           "--set", "train.compile=true", "--models", str(tmp_path / "models"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "KOE5_COMPILE_BACKEND": "aot_eager"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines() if '"train_step"' in line]
    assert row["prefetch"] == 1 and row["host_lengths"] is False and row["compiles"] > 0
    assert row["triples_per_s"] > 0 and row["final_loss"] == row["final_loss"]
    assert (tmp_path / "models" / "tiny" / "config.json").exists()  # kept for the next call of a lever matrix
