"""`koe5 data bench`: the held-out side of a source as a BEIR benchmark that load_benchmark loads, with the
right qrels, deterministic ids, and no query the training side also has (the leakage guard finds none)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from koe5.cli import main
from koe5.data.bench_commands import build_bench
from koe5.data.errors import DataError
from koe5.data.triples import read_triples
from koe5.eval.benchmark import load_benchmark
from koe5.spec import expand

SPEC = """
name: bench
model: {name_or_path: builtin:tiny-ko-bert, query_max_len: 16, passage_max_len: 32}
train: {batch_size: 8, max_steps: 1, device: cpu}
cache: {chunk_size: 8}
data:
  sources:
    - {path: squad.json, format: squad, name: korquad, holdout: {fraction: 0.5, side: train, seed: 7}}
    - {path: pairs.tsv, format: scored_pairs, min_score: 1.0, fields: {query: a, document: b}, name: sts}
"""


def write_squad(path: Path, n_articles: int = 12) -> dict:
    """n articles of 3 paragraphs with 2 questions each; returns question -> (title, its paragraph)."""
    answers, data = {}, []
    for i in range(n_articles):
        paragraphs = []
        for p in range(3):
            context = f"{i}번 문서의 {p}번째 문단입니다."
            questions = [f"{i}번 문서 {p}번 문단의 질문 {q}?" for q in range(2)]
            answers.update({q: (f"문서 {i}", context) for q in questions})
            paragraphs.append({"context": context, "qas": [{"id": q, "question": q, "answers": []} for q in questions]})
        data.append({"title": f"문서 {i}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "t", "data": data}, ensure_ascii=False), encoding="utf-8")
    return answers


@pytest.fixture
def spec(tmp_path):
    answers = write_squad(tmp_path / "squad.json")
    (tmp_path / "pairs.tsv").write_text("a\tb\tscore\n가\t나\t5\n", encoding="utf-8")
    (tmp_path / "spec.yaml").write_text(SPEC, encoding="utf-8")
    rs = expand(tmp_path / "spec.yaml", check_devices=False)[0]
    return SimpleNamespace(path=tmp_path / "spec.yaml", spec=rs.spec, answers=answers, dir=tmp_path)


def test_the_bench_side_loads_as_a_beir_benchmark_with_the_right_qrels(spec):
    source = spec.spec.data.sources[0]
    out = spec.dir / "bench"
    meta = build_bench(source, out)
    bench = load_benchmark(str(out))
    train = read_triples(source)  # side: train, as training reads it
    bench_titles = {spec.answers[q][0] for q in bench.query_texts}
    assert bench_titles.isdisjoint({t.unit for t in train})
    # queries: every question of the held-out articles, and nothing else
    assert sorted(bench.query_texts) == sorted(q for q, (title, _) in spec.answers.items() if title in bench_titles)
    assert len(bench.query_texts) + len(train) == len(spec.answers)
    # corpus: every paragraph of the held-out articles
    assert sorted(bench.corpus_texts) == sorted({c for title, c in spec.answers.values() if title in bench_titles})
    # qrels: each question -> its own paragraph, grade 1
    corpus = dict(zip(bench.corpus_ids, bench.corpus_texts))
    for qid, text in zip(bench.query_ids, bench.query_texts):
        assert {corpus[d]: g for d, g in bench.qrels[qid].items()} == {spec.answers[text][1]: 1}
    assert meta["queries"] == len(bench.query_ids) and meta["corpus"] == len(bench.corpus_ids)
    assert meta["units"] == len(bench_titles) and meta["other_side"]["units"] == len({t.unit for t in train})
    assert 0 < meta["units"] < 12
    # deterministic: the same source and split write the same bytes (into a folder of the same name, which
    # is the benchmark's own name in meta.json)
    assert meta["name"] == "bench" and bench.name == "bench"
    build_bench(source, spec.dir / "again" / "bench")
    for name in ("queries.jsonl", "corpus.jsonl", "qrels/test.tsv", "meta.json"):
        assert (out / name).read_bytes() == (spec.dir / "again" / "bench" / name).read_bytes()


def test_the_command_writes_the_benchmark_and_refuses_sentence_pairs_and_unsplit_sources(spec, capsys):
    out = spec.dir / "cli"
    assert main(["data", "bench", str(spec.path), "--source", "korquad", "--out", str(out)]) == 0
    assert "queries" in capsys.readouterr().out and load_benchmark(str(out)).qrels
    assert json.loads((out / "meta.json").read_text())["source"] == "korquad"
    assert main(["data", "bench", str(spec.path), "--source", "sts", "--out", str(spec.dir / "x")]) == 2
    assert "has format scored_pairs: its rows are sentence pairs" in capsys.readouterr().err
    assert main(["data", "bench", str(spec.path), "data.sources[0].holdout.fraction=0", "--source", "korquad",
                 "--out", str(spec.dir / "x")]) == 2
    assert "has no holdout" in capsys.readouterr().err
    assert main(["data", "bench", str(spec.path), "--source", "nope", "--out", str(spec.dir / "x")]) == 2
    assert "no source named 'nope'" in capsys.readouterr().err
    with pytest.raises(DataError, match="has format nli"):
        build_bench(dataclasses.replace(spec.spec.data.sources[0], format="nli"), spec.dir / "x")


def test_a_query_the_training_side_also_has_is_left_out_of_the_bench(spec):
    source = spec.spec.data.sources[0]
    train_titles = {t.unit for t in read_triples(source)}
    data = json.loads((spec.dir / "squad.json").read_text(encoding="utf-8"))
    # copy a question of a training-side article into a bench-side article (other punctuation and spacing)
    train_q = next(a for a in data["data"] if a["title"] in train_titles)["paragraphs"][0]["qas"][0]["question"]
    bench_article = next(a for a in data["data"] if a["title"] not in train_titles)
    bench_article["paragraphs"][0]["qas"].append({"id": "dup", "question": "  " + train_q.rstrip("?") + " !"})
    (spec.dir / "squad.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    meta = build_bench(source, spec.dir / "bench")
    assert meta["queries_also_on_the_other_side"] == 1
    assert all(q.strip() != train_q.rstrip("?") + " !" for q in load_benchmark(str(spec.dir / "bench")).query_texts)


def test_the_leakage_guard_finds_no_bench_query_in_the_train_side_and_finds_them_without_holdout(spec):
    from koe5.data.dataset import load_tokenizer
    from koe5.data.leakage import find_leaks
    from koe5.data.tokens import open_tokenized

    s = spec.spec
    build_bench(s.data.sources[0], spec.dir / "bench")
    bench = load_benchmark(str(spec.dir / "bench"))
    tokenizer = load_tokenizer(s)

    def leaks(source) -> dict:
        data = SimpleNamespace(sources=[open_tokenized(source, s, tokenizer)])
        return find_leaks(data, [bench])[bench.name]

    train_side = leaks(s.data.sources[0])
    assert (train_side["exact"], train_side["normalized"]) == (0, 0)
    whole = leaks(dataclasses.replace(s.data.sources[0], holdout=dataclasses.replace(s.data.sources[0].holdout,
                                                                                     fraction=0.0)))
    assert whole["exact"] == whole["normalized"] == len(bench.query_ids)
