"""Smoke run of the evaluation benchmark on CPU: --dtype (issue 17, lever 6) encodes with bf16 weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_eval_dtype_flag_encodes_with_bf16_weights():
    proc = subprocess.run([sys.executable, "benchmarks/bench_eval.py", "--passages", "300", "--queries", "20",
                           "--max-len", "32", "--dtype", "bf16", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["dtype"] == "bf16" and report["param_dtype"] == "torch.bfloat16"
    cold, cached = report["runs"]
    assert cold["encode_passages"] > 0 and cached["ndcg@10"] == cold["ndcg@10"]
