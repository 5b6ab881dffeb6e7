"""Benchmark loading (BEIR and AutoRAG layouts), exact search with ties, and evaluate() end to end."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koe5.eval.benchmark import BenchmarkError, load_benchmark
from koe5.eval.evaluate import evaluate
from koe5.eval.metrics import compute_metrics
from koe5.eval.search import search

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "koe5", "assets", "ko_sample", "bench")

CORPUS = [
    ("d1", "서울", "서울은 대한민국의 수도이며 인구가 가장 많은 도시이다."),
    ("d2", "", "부산은 한국 남동부에 있는 항구 도시로 해운대 해수욕장이 유명하다."),
    ("d3", "김치", "김치는 배추와 고춧가루로 담그는 한국의 전통 발효 음식이다."),
    ("d4", "한글", "한글은 세종대왕이 1443년에 창제한 문자이다."),
    ("d5", "", "제주도는 화산섬으로 한라산이 섬 중앙에 있다."),
    ("d6", "비빔밥", "비빔밥은 밥에 나물과 고추장을 넣어 비벼 먹는 음식이다."),
]
QUERIES = [
    ("q1", "한국의 수도는 어디인가?", {"d1": 1}),
    ("q2", "해운대 해수욕장이 있는 도시는?", {"d2": 1}),
    ("q3", "한국의 발효 음식에는 무엇이 있나?", {"d3": 2, "d6": 1}),
    ("q4", "한글을 만든 사람은 누구인가?", {"d4": 1}),
    ("q5", "한라산은 어디에 있나?", {"d5": 1, "d1": 0}),
    ("q6", "판단 없는 질문", {"d2": 0}),  # all judgments 0: excluded from the means
]


def write_beir(root, corpus=CORPUS, queries=QUERIES, extra_query=True):
    os.makedirs(root / "qrels", exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for did, title, text in corpus:
            f.write(json.dumps({"_id": did, "title": title, "text": text}, ensure_ascii=False) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for qid, text, _ in queries:
            f.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
        if extra_query:  # a query of another split: not in test.tsv, so not evaluated
            f.write(json.dumps({"_id": "train1", "text": "학습용 질문"}, ensure_ascii=False) + "\n")
    with open(root / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for qid, _, rel in queries:
            for did, grade in rel.items():
                f.write(f"{qid}\t{did}\t{grade}\n")
    return root


def beir_to_autorag(bench, root):
    """Write a loaded benchmark in the AutoRAG layout (grades become binary, as AutoRAG has no grades)."""
    os.makedirs(root, exist_ok=True)
    pq.write_table(pa.table({"doc_id": bench.corpus_ids, "contents": bench.corpus_texts}), root / "corpus.parquet")
    gts = [[[d for d, g in bench.qrels[q].items() if g >= 1]] for q in bench.query_ids]
    pq.write_table(pa.table({"qid": bench.query_ids, "query": bench.query_texts, "retrieval_gt": gts}),
                   root / "qa_test.parquet")
    return root


def ngram_encoder(dim: int = 256):
    """A deterministic fake encoder: hashed character bigram counts, L2-normalized."""
    def encode(texts):
        out = np.zeros((len(texts), dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for a, b in zip(text, text[1:]):
                h = int.from_bytes(hashlib.blake2b((a + b).encode(), digest_size=4).digest(), "little")
                out[row, h % dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)
    return encode


def test_beir_layout_loads_with_mteb_passage_text(tmp_path):
    bench = load_benchmark(str(write_beir(tmp_path / "b")), name="mini")
    assert bench.name == "mini" and bench.layout == "beir"
    assert bench.corpus_texts[0] == "서울 서울은 대한민국의 수도이며 인구가 가장 많은 도시이다."
    assert bench.corpus_texts[1] == CORPUS[1][2]  # empty title: text alone, no leading space
    assert "train1" not in bench.query_ids and len(bench.query_ids) == 6
    assert bench.qrels["q3"] == {"d3": 2, "d6": 1}


def test_a_benchmark_directory_names_itself(tmp_path):
    """`koe5 eval --benchmark DIR` reports under the name the benchmark gives itself, the column a spec's
    `eval.benchmarks[].name` fills; the shipped sample is `ko-sample`, not its folder's name `bench`."""
    assert load_benchmark(SAMPLE).name == "ko-sample"
    root = write_beir(tmp_path / "folder")
    assert load_benchmark(str(root)).name == "folder"
    (root / "meta.json").write_text('{"name": "korquad-dev"}', encoding="utf-8")
    assert load_benchmark(str(root)).name == "korquad-dev"
    assert load_benchmark(str(root), name="given").name == "given"
    (root / "meta.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(BenchmarkError, match="meta.json"):
        load_benchmark(str(root))


def test_fingerprint_tracks_content_not_layout(tmp_path):
    binary = [(q, t, {d: min(g, 1) for d, g in rel.items()}) for q, t, rel in QUERIES]
    beir = load_benchmark(str(write_beir(tmp_path / "b", queries=binary)))
    again = load_benchmark(str(write_beir(tmp_path / "c", queries=binary, extra_query=False)))
    assert beir.fingerprint == again.fingerprint
    edited = [(d, t, x + ("!" if d == "d4" else "")) for d, t, x in CORPUS]
    changed = load_benchmark(str(write_beir(tmp_path / "e", corpus=edited, queries=binary)))
    assert changed.fingerprint != beir.fingerprint
    # AutoRAG drops zero grades from its lists, so compare against qrels holding only the positives.
    positives = [(q, t, {d: g for d, g in rel.items() if g >= 1}) for q, t, rel in binary]
    beir_pos = load_benchmark(str(write_beir(tmp_path / "p", queries=positives)))
    autorag = load_benchmark(str(beir_to_autorag(beir_pos, tmp_path / "a")))
    assert autorag.layout == "autorag"
    assert autorag.fingerprint == beir_pos.fingerprint


def test_beir_and_autorag_layouts_give_identical_metrics(tmp_path):
    # The project sample when it is complete, else the small fixture above.
    complete = os.path.exists(os.path.join(SAMPLE, "qrels", "test.tsv"))
    src = SAMPLE if complete else str(write_beir(tmp_path / "b"))
    beir = load_benchmark(src)
    autorag = load_benchmark(str(beir_to_autorag(beir, tmp_path / "a")))
    enc = ngram_encoder()
    r1 = evaluate(enc, enc, beir, [1, 3, 5, 10])
    r2 = evaluate(enc, enc, autorag, [1, 3, 5, 10])
    # Recall/precision/MRR/MAP use binary relevance, so they agree even where BEIR grades are > 1.
    for key in r1.metrics.aggregate:
        if key[0] != "ndcg" or all(g <= 1 for j in beir.qrels.values() for g in j.values()):
            assert r1.metrics.aggregate[key] == r2.metrics.aggregate[key], key
    assert r1.n_queries == r2.n_queries > 0
    assert set(r1.seconds) == {"encode_queries", "encode_passages", "search", "metrics"}


def test_evaluate_finds_the_obvious_answers(tmp_path):
    bench = load_benchmark(str(write_beir(tmp_path / "b")))
    enc = ngram_encoder()
    res = evaluate(enc, enc, bench, [1, 3])
    assert res.metrics.n_excluded == 1  # q6
    assert res.metrics.aggregate[("recall", 3)] >= 0.8  # bigram overlap is enough on this toy set
    # Brute-force reference: the full score matrix, ranked by the metrics module itself.
    q, p = enc(bench.query_texts), enc(bench.corpus_texts)
    full = {qid: {d: float(s) for d, s in zip(bench.corpus_ids, row)} for qid, row in zip(bench.query_ids, q @ p.T)}
    ref = compute_metrics(full, bench.qrels, [1, 3])
    for key, value in ref.aggregate.items():
        assert res.metrics.aggregate[key] == pytest.approx(value, abs=1e-6)


def test_search_keeps_ties_at_the_cut():
    rng = np.random.default_rng(0)
    passages = rng.normal(size=(200, 8)).astype(np.float32)
    passages[50:120] = passages[3]  # 70 identical passages tie with each other
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    queries = np.stack([passages[3], rng.normal(size=8).astype(np.float32)])
    hits = search(queries, passages, 5)
    idx, scores = hits[0]
    brute = passages @ queries[0]
    kth = np.sort(brute)[::-1][4]
    assert set(idx.tolist()) == set(np.flatnonzero(brute >= kth).tolist())
    assert len(idx) >= 71
    idx1, _ = hits[1]
    assert set(idx1.tolist()) == set(np.argsort(-(passages @ queries[1]))[:5].tolist())


@pytest.mark.parametrize("content, message", [
    ('{"_id": "d1", "text": "a"}\nnot json\n', r"corpus.jsonl:2: not valid JSON"),
    ('{"_id": "d1", "text": "a"}\n{"text": "b"}\n', r"corpus.jsonl:2: missing key '_id'"),
    ('{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n', r"corpus.jsonl:2: duplicate id 'd1'"),
])
def test_bad_beir_lines_are_named(tmp_path, content, message):
    root = write_beir(tmp_path / "b")
    (root / "corpus.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark(str(root))


def test_bad_qrels_and_missing_files(tmp_path):
    root = write_beir(tmp_path / "b")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tx\n", encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"test.tsv:2: score 'x'"):
        load_benchmark(str(root))
    with pytest.raises(BenchmarkError, match="no corpus.jsonl"):
        load_benchmark(str(tmp_path))
    with pytest.raises(BenchmarkError, match="not a preset"):
        load_benchmark(str(tmp_path / "nope"))


def test_bad_autorag_columns(tmp_path):
    root = tmp_path / "a"
    root.mkdir()
    pq.write_table(pa.table({"doc_id": ["d1"], "text": ["x"]}), root / "corpus.parquet")
    pq.write_table(pa.table({"qid": ["q"], "query": ["x"], "retrieval_gt": [[["d1"]]]}), root / "qa.parquet")
    with pytest.raises(BenchmarkError, match=r"corpus.parquet: missing column\(s\) \['contents'\]"):
        load_benchmark(str(root))


def test_embedding_cache_reuses_only_identical_texts_and_settings(tmp_path):
    from koe5.eval.evaluate import cached

    calls = []
    base = ngram_encoder()

    def counting(texts):
        calls.append(len(texts))
        return base(texts)

    key = {"model": "abc", "prefix": "passage: ", "max_len": 512}
    enc = cached(counting, str(tmp_path), key)
    texts = [t for _, _, t in CORPUS]
    first = enc(texts)
    again = enc(texts)
    assert calls == [6] and np.array_equal(first, again)
    enc(texts[:-1] + [texts[-1] + "!"])  # one passage edited
    cached(counting, str(tmp_path), {**key, "max_len": 256})(texts)  # another setting
    assert calls == [6, 6, 6]
    assert len(list(tmp_path.glob("*.npy"))) == 3 and not list(tmp_path.glob("*.tmp"))


def test_hugging_face_layouts_match_beir(tmp_path):
    import datasets  # a dev dependency: a broken install must fail here, not skip (imported here: it is slow)
    beir = load_benchmark(str(write_beir(tmp_path / "b")))
    corpus = [{"_id": d, "title": t, "text": x} for d, t, x in CORPUS]
    queries = [{"_id": q, "text": t} for q, t, _ in QUERIES]
    qrels = [{"query-id": q, "corpus-id": d, "score": g} for q, _, rel in QUERIES for d, g in rel.items()]

    # save_to_disk: corpus/queries as single datasets, qrels as a DatasetDict with a train split to ignore.
    disk = tmp_path / "disk"
    datasets.Dataset.from_list(corpus).save_to_disk(str(disk / "corpus"))
    datasets.Dataset.from_list(queries).save_to_disk(str(disk / "queries"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(qrels),
                          "train": datasets.Dataset.from_list(qrels[:1])}).save_to_disk(str(disk / "default"))
    # Hub file layout: parquet shards named by split.
    hub = tmp_path / "hub"
    for name, rows in (("corpus", corpus), ("queries", queries)):
        (hub / name).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), hub / name / f"{name}-00000-of-00001.parquet")
    (hub / "qrels").mkdir()
    pq.write_table(pa.Table.from_pylist(qrels), hub / "qrels" / "test-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(qrels[:2]), hub / "qrels" / "dev-00000-of-00001.parquet")

    for root in (disk, hub):
        bench = load_benchmark(str(root))
        assert bench.layout == "hf"
        assert bench.fingerprint == beir.fingerprint
        assert bench.corpus_texts == beir.corpus_texts and bench.qrels == beir.qrels


def test_hnsw_search_finds_nearly_the_exact_neighbours():
    rng = np.random.default_rng(1)
    passages = rng.normal(size=(3000, 32)).astype(np.float32)
    passages /= np.linalg.norm(passages, axis=1, keepdims=True)
    queries = passages[:100] + 0.1 * rng.normal(size=(100, 32)).astype(np.float32)
    exact = search(queries, passages, 10)
    approx = search(queries, passages, 10, index="hnsw")
    overlap = np.mean([len(set(a[0]) & set(e[0])) / 10 for a, e in zip(approx, exact)])
    assert overlap > 0.9 and all(len(a[0]) == 10 for a in approx)
    with pytest.raises(ValueError, match="unknown index"):
        search(queries, passages, 10, index="ivf")
