"""Weighted mixing of sources, the leakage guard, and bad training lines stopping a run before it is recorded."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from koe5.data.dataset import load_training_data, source_probabilities
from koe5.data.leakage import find_leaks, normalize
from koe5.spec import expand

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def write_source(path: Path, prefix: str, n: int) -> Path:
    path.write_text("".join(json.dumps({"query": f"{prefix} 질문 {i}", "document": f"{prefix} 문서 {i}",
                                        "hard_negative": f"{prefix} 오답 {i}"}, ensure_ascii=False) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


@pytest.mark.parametrize("mixing", ["weighted", "proportional"])
def test_two_sources_at_weights_3_to_1_are_drawn_3_to_1(tmp_path, mixing):
    a = write_source(tmp_path / "a.jsonl", "a", 200)
    b = write_source(tmp_path / "b.jsonl", "b", 200)  # equal sizes: both mixing modes give 3:1
    rs = expand(QUICKSTART, [f"data.sources[0].path={a}", "data.sources[0].name=a.jsonl", "data.sources[0].weight=3",
                             f"data.sources[1].path={b}",
                             f"data.mixing={mixing}", "train.batch_size=32"])[0]
    data = load_training_data(rs.spec)
    drawn = Counter(data.names[k] for step in range(125) for k in data.global_batch(step).source)  # 4,000 examples
    assert sum(drawn.values()) == 4000
    assert abs(drawn["a.jsonl"] / drawn["b.jsonl"] - 3) < 3 * 0.05
    # the same step gives the same batch: every rank, and a resumed run, agree
    assert data.global_batch(17).ids() == load_training_data(rs.spec).global_batch(17).ids()


def test_mixing_modes_define_source_probabilities():
    assert source_probabilities([100, 900], [1, 1], "proportional", 2.0).tolist() == pytest.approx([0.1, 0.9])
    assert source_probabilities([100, 900], [1, 1], "weighted", 2.0).tolist() == pytest.approx([0.5, 0.5])
    assert source_probabilities([100, 900], [1, 1], "temperature", 2.0).tolist() == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("where", ["query", "document"])
def test_leakage_guard_finds_normalized_query_overlap(tmp_path, where):
    from koe5.eval.benchmark import load_benchmark

    bench = load_benchmark(str(ROOT / "koe5" / "assets" / "ko_sample" / "bench"), name="ko-sample")
    leaked, exact = bench.query_texts[5], bench.query_texts[7]
    rows = [{"query": "딴 질문", "document": "문서", "hard_negative": "오답"} for _ in range(3)]
    rows[0][where] = "  " + leaked.upper().replace(" ", "   ") + "!!"  # the same query, differently written
    rows[1][where] = exact
    rows[2]["hard_negative"] = bench.query_texts[9]  # negatives are not guarded: they are not trained as matches
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    spec = expand(QUICKSTART, [f"data.sources[0].path={path}", "train.batch_size=2", "cache.chunk_size=2"])[0].spec
    report = find_leaks(load_training_data(spec), [bench])["ko-sample"]
    assert report["normalized"] == 2 and report["exact"] == 1 and report["examples"] == [leaked, exact]
    assert normalize("Hello, World!") == normalize("hello world")


def run(*args, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "koe5.run", str(QUICKSTART), *args, f"output_dir={tmp_path}/runs",
                           "--force"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "KOE5_REGISTRY": str(tmp_path / "r.duckdb")})


def test_leakage_error_stops_the_run_before_it_is_recorded(tmp_path):
    bench_query = (ROOT / "koe5/assets/ko_sample/bench/queries.jsonl").read_text(encoding="utf-8").splitlines()[0]
    source = write_source(tmp_path / "leaky.jsonl", "x", 40)
    with open(source, "a", encoding="utf-8") as f:
        f.write(json.dumps({"query": json.loads(bench_query)["text"], "document": "d", "hard_negative": "n"},
                           ensure_ascii=False) + "\n")
    proc = run(f"data.sources[0].path={source}", "data.leakage=error", tmp_path=tmp_path)
    assert proc.returncode == 2 and "also appear in the training data" in proc.stderr
    assert "ko-sample: 1 queries" in proc.stderr and not (tmp_path / "r.duckdb").exists()


@pytest.mark.parametrize("line,field", [
    ('{"query": "q", "document": "d", "hard_negative": "n"', None),   # malformed JSON
    ('{"query": "q", "hard_negative": "n"}', "document"),              # missing field
    ('{"query": "", "document": "d", "hard_negative": "n"}', "query"),  # empty field
    ('{"query": 5, "document": "d", "hard_negative": "n"}', "query"),   # wrong type
])
def test_a_bad_training_line_stops_the_run_naming_file_line_and_field(tmp_path, line, field):
    source = write_source(tmp_path / "bad.jsonl", "x", 40)
    with open(source, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    proc = run(f"data.sources[0].path={source}", tmp_path=tmp_path)
    assert proc.returncode == 2 and f"{source}:41" in proc.stderr and "Traceback" not in proc.stderr
    if field:
        assert f"'{field}'" in proc.stderr
    assert not (tmp_path / "r.duckdb").exists()  # nothing is recorded for a run that never trained


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    source = write_source(tmp_path / "latin.jsonl", "x", 40)
    with open(source, "ab") as f:
        f.write('{"query": "caf\u00e9", "document": "d", "hard_negative": "n"}\n'.encode("latin-1"))
    proc = run(f"data.sources[0].path={source}", tmp_path=tmp_path)
    assert proc.returncode == 2 and f"{source}:41" in proc.stderr and "UTF-8" in proc.stderr


def test_data_stats_reports_counts_lengths_duplicates_and_the_draw(tmp_path, capsys):
    from koe5.cli import main

    a = write_source(tmp_path / "a.jsonl", "a", 64)
    with open(a, "a", encoding="utf-8") as f:  # a repeated query and document
        f.write(json.dumps({"query": "a 질문 1", "document": "a 문서 1", "hard_negative": "z"}, ensure_ascii=False) + "\n")
    assert main(["data", "stats", str(QUICKSTART), f"data.sources[0].path={a}", "data.sources[0].name=a",
                 "model.query_max_len=4", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    s = stats["sources"]["a"]
    assert s["examples"] == 65 and s["duplicate_queries"] == 1 and s["duplicate_documents"] == 1
    assert s["queries_over_max_len"] == 65  # "query: a 질문 N" is longer than 4 tokens
    assert stats["one_epoch_draws"] == {"a": 64}  # two full batches of 32; the partial one is dropped
    assert main(["data", "stats", str(QUICKSTART), "data.sources[0].path=/nope.jsonl"]) == 2
