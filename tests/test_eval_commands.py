"""`koe5 eval` end to end (both layouts, registry record, artifacts), `koe5 bench`, and result exports."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from koe5.eval import presets
from koe5.eval.benchmark import load_benchmark
from koe5.eval.evaluate import evaluate, write_mteb_json, write_per_query
from test_eval_benchmark import SAMPLE, beir_to_autorag, ngram_encoder, write_beir

from koe5 import cli, registry  # koe5's own modules: a broken import must fail these tests, never skip them


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_gives_identical_numbers_for_both_layouts_and_records_a_baseline(tmp_path, capsys):
    # The project's sample benchmark when it is complete, else the small fixture; grades made binary
    # because the AutoRAG layout has none, so both directories hold identical content.
    complete = os.path.exists(os.path.join(SAMPLE, "qrels", "test.tsv"))
    src = load_benchmark(SAMPLE if complete else str(write_beir(tmp_path / "fixture")))
    beir_dir = presets.write_beir(
        str(tmp_path / "beir"),
        [{"_id": d, "text": t} for d, t in zip(src.corpus_ids, src.corpus_texts)],
        [{"_id": q, "text": t} for q, t in zip(src.query_ids, src.query_texts)],
        [(q, d, 1) for q, j in src.qrels.items() for d, g in j.items() if g >= 1])
    autorag_dir = beir_to_autorag(load_benchmark(beir_dir), tmp_path / "autorag")
    n_judged = sum(1 for j in src.qrels.values() if any(g >= 1 for g in j.values()))
    fast = ["--model", "builtin:tiny-ko-bert", "--k", "1", "3", "--query-max-len", "64", "--passage-max-len", "128"]
    common = fast + ["--json", "--no-record", "--no-cache"]
    code, out, err = run_cli(capsys, "eval", "--benchmark", f"mini={beir_dir}", *common)
    assert code == 0, err
    a = json.loads(out)["results"][0]
    assert a["benchmark"] == "mini"
    code, out, err = run_cli(capsys, "eval", "--benchmark", str(autorag_dir), *common)
    assert code == 0, err
    b = json.loads(out)["results"][0]
    assert a["metrics"] == b["metrics"] and a["fingerprint"] == b["fingerprint"]
    assert set(a["metrics"]) == {f"{m}@{k}" for m in ("ndcg", "recall", "precision", "f1", "mrr", "map") for k in (1, 3)}


    reg_path = tmp_path / "reg.duckdb"
    code, out, err = run_cli(capsys, "eval", "--benchmark", str(beir_dir), *fast,
                             "--registry", str(reg_path), "--name", "tiny-baseline",
                             "--cache-dir", str(tmp_path / "emb"))
    assert code == 0, err
    assert "ndcg@1" in out and "recorded baseline run" in out
    assert len(list((tmp_path / "emb").glob("*.npy"))) == 2  # queries and passages
    reg = registry.Registry(reg_path)
    cols, rows = reg.query("SELECT kind, status FROM runs WHERE name = 'tiny-baseline'")
    assert rows == [("baseline", "finished")]
    # where it was evaluated is recorded: GPU (bf16 autocast) and CPU (fp32) numbers differ slightly
    record = reg.get_run(reg.query("SELECT run_id FROM runs WHERE name = 'tiny-baseline'")[1][0][0])
    assert record["devices"] == [f"cpu ({os.cpu_count()} cores)"] and record["world_size"] == 1
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    cols, rows = reg.query("SELECT value, fingerprint FROM metrics WHERE metric = 'ndcg' AND k = 3")
    assert rows[0][0] == pytest.approx(a["metrics"]["ndcg@3"]) and rows[0][1] == a["fingerprint"]
    cols, rows = reg.query("SELECT path FROM artifacts WHERE kind = 'per_query'")
    per_query = pd.read_parquet(rows[0][0])
    assert len(per_query) == n_judged and per_query["excluded"].sum() == 0


def test_eval_bad_benchmark_exits_2_without_traceback(tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", "--model", "builtin:tiny-ko-bert", "--benchmark", str(tmp_path / "nope"))
    assert code == 2 and "not a preset name" in err and "Traceback" not in err


def test_bench_fetch_without_network_says_what_to_do(tmp_path, capsys, monkeypatch):
    import datasets  # a dependency: a broken install must fail here, not skip (imported here: it is slow)

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("KOE5_BENCHMARKS", str(tmp_path))
    code, out, err = run_cli(capsys, "bench", "fetch", "ko-strategyqa")
    assert code == 2 and "taeminlee/Ko-StrategyQA" in err and "What to do" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "bench", "fetch", "no-such-benchmark")
    assert code == 2 and "known:" in err
    code, out, err = run_cli(capsys, "eval", "--model", "x", "--benchmark", "autorag")
    assert code == 2 and "koe5 bench fetch autorag" in err


def test_fetch_writes_a_loadable_benchmark(tmp_path, monkeypatch):
    monkeypatch.setenv("KOE5_BENCHMARKS", str(tmp_path))
    rows = [{"question": "독감 예방 주사는 언제 맞나요?", "answer": "가을에 맞는 것이 좋습니다."},
            {"question": "손은 어떻게 씻나요?", "answer": "비누로 30초 이상 씻습니다."},
            {"question": "손은 어떻게 씻나요?", "answer": "흐르는 물에 씻습니다."},
            {"question": None, "answer": "버려지는 행"}]
    path = presets.fetch("publichealthqa", load_dataset=lambda *a, **k: rows)
    bench = load_benchmark("publichealthqa")
    assert path == os.path.join(str(tmp_path), "publichealthqa") and bench.name == "publichealthqa"
    assert len(bench.query_ids) == 2 and len(bench.corpus_ids) == 3
    assert sorted(len(j) for j in bench.qrels.values()) == [1, 2]

    def hub(hub_id, config, split=None, revision=None):
        data = {"corpus": {"ko": [{"_id": "d1", "title": "제목", "text": "본문"}, {"_id": "d2", "title": "", "text": "둘"}]},
                "queries": {"ko": [{"_id": "q1", "text": "질문"}]},
                "default": [{"query-id": "q1", "corpus-id": "d1", "score": 1}]}[config]
        return data
    presets.fetch("ko-strategyqa", load_dataset=hub)
    bench = load_benchmark("ko-strategyqa")
    assert bench.corpus_texts == ["제목 본문", "둘"] and bench.qrels == {"q1": {"d1": 1}}


def test_per_query_artifact_and_mteb_json(tmp_path):
    bench = load_benchmark(str(write_beir(tmp_path / "b")))
    enc = ngram_encoder()
    result = evaluate(enc, enc, bench, [1, 10])
    for name in ("pq.parquet", "pq.jsonl"):
        path = write_per_query(result, str(tmp_path / name))
        rows = pd.read_parquet(path) if name.endswith("parquet") else pd.read_json(path, lines=True)
        assert len(rows) == 6 and rows["excluded"].sum() == 1
        judged = rows[~rows["excluded"]]
        assert judged["ndcg@10"].mean() == pytest.approx(result.metrics.aggregate[("ndcg", 10)])
        # MRR@10 per query is 1 / rank of the first relevant document when that rank is <= 10.
        expect = [1 / r if r == r and r <= 10 else 0.0 for r in judged["first_relevant_rank"]]
        assert list(judged["mrr@10"]) == pytest.approx(expect)
        # The passage ranked first, recomputed here by brute force: the highest score (ties: trec_eval's order)
        q_emb, p_emb = enc(bench.query_texts), enc(bench.corpus_texts)
        best = {q: max(zip((q_emb[i] @ p_emb.T).astype(np.float32), bench.corpus_ids))[1]
                for i, q in enumerate(bench.query_ids)}
        assert dict(zip(judged["qid"], judged["top_document"])) == {q: best[q] for q in judged["qid"]}
        # A query ranked right first has its relevant passage there, and only then.
        for qid, top, rank in zip(judged["qid"], judged["top_document"], judged["first_relevant_rank"]):
            assert (bench.qrels[qid].get(top, 0) > 0) == (rank == 1)
    doc = json.load(open(write_mteb_json(result, str(tmp_path / "mteb"), "fake", split="test"), encoding="utf-8"))
    scores = doc["scores"]["test"][0]
    assert scores["main_score"] == scores["ndcg_at_10"] == result.metrics.aggregate[("ndcg", 10)]
    assert doc["dataset_fingerprint"] == bench.fingerprint and doc["n_excluded_queries"] == 1
