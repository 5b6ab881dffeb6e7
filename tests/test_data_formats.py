"""Published Korean dataset layouts read straight from the spec (koe5/data/formats.py): each format gives
exactly the expected triples from a small file written here in its real layout (cp949 CSV, BOM CSV,
headerless TSV, SQuAD JSON, ...), a bad row names file:line (or its JSON path), a wrong encoding names
file:line, and the holdout sides are disjoint and cover the source."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from koe5.data.errors import DataError
from koe5.data.triples import read_triples
from koe5.spec import SpecError, expand
from koe5.spec.schema import FieldsSpec, HoldoutSpec, SourceSpec

KO_PUBLIC = Path("/work/shared/data/ko_public")


def source(path, **keys) -> SourceSpec:
    fields = FieldsSpec(**keys.pop("fields", {}))
    return SourceSpec(path=str(path), fields=fields, holdout=HoldoutSpec(**keys.pop("holdout", {})), **keys)


def rows(triples) -> list[tuple]:
    return [(t.query, t.positives, t.hard_negatives, t.unit) for t in triples]


# ---------------------------------------------------------------- squad

def squad(articles) -> dict:
    """SQuAD JSON from [(title, [(context, [question, ...]), ...]), ...]."""
    return {"version": "test", "data": [
        {"title": title, "paragraphs": [
            {"context": ctx, "qas": [{"id": f"{title}-{p}-{q}", "question": text,
                                      "answers": [{"text": ctx[:2], "answer_start": 0}]} for q, text in enumerate(qs)]}
            for p, (ctx, qs) in enumerate(paragraphs)]}
        for title, paragraphs in articles]}


def write_squad(path: Path, articles) -> Path:
    path.write_text(json.dumps(squad(articles), ensure_ascii=False), encoding="utf-8")
    return path


def test_squad_questions_get_their_paragraph_and_the_articles_other_paragraphs_in_order(tmp_path):
    data = squad([("서울", [("서울은 수도이다.", ["수도는?"]), ("서울의 인구는 많다.", ["인구는?", "많은가?"]),
                           ("한강이 흐른다.", ["강은?"])]),
                  ("부산", [("부산은 항구이다.", ["항구는?"])])])
    data["data"][0]["paragraphs"][2]["qas"].append({"id": "x", "question": "답이 없는 질문?", "answers": [],
                                                     "is_impossible": True})
    path = tmp_path / "korquad.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    notes: dict = {}
    got = read_triples(source(path, format="squad"), hard_negatives=2, notes=notes)
    a, b, c = "서울은 수도이다.", "서울의 인구는 많다.", "한강이 흐른다."
    assert rows(got) == [
        ("수도는?", (a,), (b, c), "서울"),
        ("인구는?", (b,), (c, a), "서울"),  # the next paragraph first, then around the article
        ("많은가?", (b,), (c, a), "서울"),
        ("강은?", (c,), (a, b), "서울"),
        ("항구는?", ("부산은 항구이다.",), (), "부산"),  # a one-paragraph article has no negatives
    ]
    assert notes == {"unanswerable": 1}
    # data.hard_negatives: 0 reads no negatives
    assert all(t.hard_negatives == () for t in read_triples(source(path, format="squad"), hard_negatives=0))


def test_squad_bad_structure_names_the_json_path_and_can_be_skipped(tmp_path):
    data = squad([("가", [("문단 하나", ["질문 하나"]), ("문단 둘", ["질문 둘"])]), ("나", [("문단 셋", ["질문 셋"])])])
    del data["data"][0]["paragraphs"][1]["qas"][0]["question"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: data\[0\]\.paragraphs\[1\]\.qas\[0\]: missing field 'question'"):
        read_triples(source(path, format="squad"))
    skipped: dict = {}
    assert [t.query for t in read_triples(source(path, format="squad"), skipped=skipped)] == ["질문 하나", "질문 셋"]
    assert skipped == {str(path): 1}
    path.write_text(json.dumps([{"question": "q", "context": "c"}]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: format squad expects SQuAD JSON"):
        read_triples(source(path, format="squad"))


# ---------------------------------------------------------------- nli (cp949 CSV, as KLUE-NLI is published)

NLI_CSV = ("index,premise,hypothesis,label\r\n"
           "0,\"씨름은 남자들의 놀이로서, 힘을 겨룬다.\",씨름은 놀이이다.,entailment\r\n"
           "1,삼성은 대응을 검토 중이다.,삼성은 아무것도 하지 않는다.,contradiction\r\n"
           "2,\"씨름은 남자들의 놀이로서, 힘을 겨룬다.\",씨름은 여자들의 놀이이다.,contradiction\r\n"
           "3,\"씨름은 남자들의 놀이로서, 힘을 겨룬다.\",씨름은 인기가 많다.,neutral\r\n"
           "4,삼성은 대응을 검토 중이다.,삼성은 회사이다.,neutral\r\n"
           "5,\"씨름은 남자들의 놀이로서, 힘을 겨룬다.\",씨름은 힘을 겨루는 놀이다.,entailment\r\n"
           "6,서울은 크다.,서울은 큰 도시이다.,entailment\r\n")
NLI_FIELDS = {"query": "premise", "document": "hypothesis", "label": "label"}
NLI_LABELS = {"entailment": ["entailment"], "contradiction": ["contradiction"], "neutral": ["neutral"]}


def write_cp949(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("cp949"))
    return path


def test_nli_groups_rows_by_premise_from_a_cp949_file(tmp_path):
    path = write_cp949(tmp_path / "nli.csv", NLI_CSV)
    notes: dict = {}
    got = read_triples(source(path, format="nli", encoding="cp949", fields=NLI_FIELDS, labels=NLI_LABELS),
                       hard_negatives=1, notes=notes)
    premise = "씨름은 남자들의 놀이로서, 힘을 겨룬다."
    assert rows(got) == [
        (premise, ("씨름은 놀이이다.", "씨름은 힘을 겨루는 놀이다."), ("씨름은 여자들의 놀이이다.",), premise),
        ("서울은 크다.", ("서울은 큰 도시이다.",), (), "서울은 크다."),
    ]
    # neutral rows are left out; a premise without an entailment gives no triple: counted, not an error
    assert notes == {"rows labelled neutral": 2, "premises without an entailment": 1}


def test_nli_labels_compare_as_text_and_an_unknown_label_names_its_line(tmp_path):
    numeric = NLI_CSV.replace(",entailment", ",0").replace(",neutral", ",1").replace(",contradiction", ",2")
    path = write_cp949(tmp_path / "nli.csv", numeric)
    src = source(path, format="nli", encoding="cp949", fields=NLI_FIELDS,
                 labels={"entailment": [0], "neutral": 1, "contradiction": ["2"]})
    assert [len(t.positives) for t in read_triples(src)] == [2, 1]
    # Every class listed: a value in none of them is a bad row (here, the words the default mapping knows).
    path = write_cp949(tmp_path / "words.csv", NLI_CSV.replace("1,삼성은 대응을 검토 중이다.,삼성은 아무것도 하지 않는다.,contradiction",
                                                              "1,삼성은 대응을 검토 중이다.,삼성은 아무것도 하지 않는다.,contradicton"))
    with pytest.raises(DataError, match=rf"^{path}:3: label 'contradicton' in field 'label' is in none of"):
        read_triples(source(path, format="nli", encoding="cp949", fields=NLI_FIELDS))
    # Only some classes listed: other values are left out, not errors.
    partial = source(path, format="nli", encoding="cp949", fields=NLI_FIELDS,
                     labels={"entailment": ["entailment"], "contradiction": ["contradiction"]})
    assert len(read_triples(partial)) == 2


def test_a_wrong_encoding_names_file_and_line(tmp_path):
    path = write_cp949(tmp_path / "nli.csv", NLI_CSV)
    with pytest.raises(DataError) as e:  # cp949 bytes read as the default utf-8
        read_triples(source(path, format="nli", fields=NLI_FIELDS))
    assert str(e.value).startswith(f"{path}:2: bytes that are not UTF-8; set the source's encoding: (e.g. cp949")
    utf8 = tmp_path / "utf8.csv"
    utf8.write_text(NLI_CSV, encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{utf8}:2: bytes that are not cp949; check the source's encoding"):
        read_triples(source(utf8, format="nli", encoding="cp949", fields=NLI_FIELDS))
    jsonl = tmp_path / "t.jsonl"  # line by line formats too
    jsonl.write_bytes('{"query": "q", "document": "d"}\n{"query": "한국어", "document": "d"}\n'.encode("euc-kr"))
    with pytest.raises(DataError, match=rf"^{jsonl}:2: bytes that are not UTF-8"):
        read_triples(source(jsonl, fields={"hard_negative": None}))
    assert [t.query for t in read_triples(source(jsonl, encoding="euc-kr", fields={"hard_negative": None}))] == ["q", "한국어"]


# ---------------------------------------------------------------- scored_pairs (KorSTS TSV, quotes inside)

STS_TSV = ("genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n"
           "main-captions\tMSRvid\t2012test\t0001\t5.000\t비행기가 이륙하고 있다.\t비행기가 이륙 중이다.\n"
           "main-news\theadlines\t2013\t0002\t1.200\t\"그는 말했다\t그녀는 울었다.\n"     # a bare quote: literal text
           "main-news\theadlines\t2013\t0003\t4.000\t남자가 \"노래\"를 부른다.\t남자가 노래한다.\n"
           "main-news\theadlines\t2013\t0004\t3.999\t개가 뛴다.\t고양이가 뛴다.\n")


def test_scored_pairs_keep_pairs_at_or_above_min_score_and_read_tsv_quotes_literally(tmp_path):
    path = tmp_path / "sts-train.tsv"
    path.write_text(STS_TSV, encoding="utf-8")
    notes: dict = {}
    src = source(path, format="scored_pairs", min_score=4.0,
                 fields={"query": "sentence1", "document": "sentence2", "score": "score"})
    assert rows(read_triples(src, hard_negatives=1, notes=notes)) == [
        ("비행기가 이륙하고 있다.", ("비행기가 이륙 중이다.",), (), "비행기가 이륙하고 있다."),
        ("남자가 \"노래\"를 부른다.", ("남자가 노래한다.",), (), "남자가 \"노래\"를 부른다."),
    ]
    assert notes == {"pairs below min_score": 2}
    path.write_text(STS_TSV.replace("\t3.999\t", "\tn/a\t"), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:5: field 'score' is not a number: 'n/a'"):
        read_triples(src)


# ---------------------------------------------------------------- paraphrase (paraKQC: headerless .txt TSV)

def test_paraphrase_groups_consecutive_lines_of_a_headerless_txt(tmp_path):
    path = tmp_path / "paraKQC_v1.txt"
    path.write_text("0\t0\t메일을 지울까?\n0\t0\t메일 지워?\n0\t0\t메일을 삭제할까?\n"
                    "1\t2\t불 켜줘\n1\t2\t불 좀 켜\n1\t2\t조명 켜줘\n", encoding="utf-8")
    src = source(path, format="paraphrase", file_type="tsv", columns=["intent", "act", "sentence"],
                 group_size=3, fields={"query": "sentence"})
    got = read_triples(src, hard_negatives=1)
    assert rows(got) == [
        ("메일을 지울까?", ("메일 지워?", "메일을 삭제할까?"), (), "메일을 지울까?"),
        ("메일 지워?", ("메일을 지울까?", "메일을 삭제할까?"), (), "메일을 지울까?"),
        ("메일을 삭제할까?", ("메일을 지울까?", "메일 지워?"), (), "메일을 지울까?"),
        ("불 켜줘", ("불 좀 켜", "조명 켜줘"), (), "불 켜줘"),
        ("불 좀 켜", ("불 켜줘", "조명 켜줘"), (), "불 켜줘"),
        ("조명 켜줘", ("불 켜줘", "불 좀 켜"), (), "불 켜줘"),
    ]
    # or a group column, wherever the group's lines are; the group's value is then its unit
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[i] for i in (0, 3, 1, 4, 2, 5)), encoding="utf-8")
    by_column = dataclasses.replace(src, group_size=None, fields=FieldsSpec(query="sentence", group="intent"))
    assert rows(read_triples(by_column)) == [(q, p, n, "0" if i < 3 else "1") for i, (q, p, n, _) in enumerate(rows(got))]


def test_paraphrase_bad_lines_name_file_and_line_and_keep_the_groups_aligned(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("0\t0\t가\n0\t0\n0\t0\t다\n1\t1\t라\n1\t1\t마\n1\t1\t바\n", encoding="utf-8")
    src = source(path, format="paraphrase", file_type="tsv", columns=["intent", "act", "sentence"],
                 group_size=3, fields={"query": "sentence"})
    with pytest.raises(DataError, match=rf"^{path}:2: missing field 'sentence' \(query\)"):
        read_triples(src)
    skipped: dict = {}
    got = read_triples(src, skipped=skipped)
    assert [(t.query, t.positives) for t in got][:2] == [("가", ("다",)), ("다", ("가",))]
    assert {t.unit for t in got[2:]} == {"라"} and skipped == {str(path): 1}
    path.write_text("0\t0\t가\n0\t0\t나\n0\t0\t다\n1\t1\t라\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: 4 records do not make groups of group_size=3"):
        read_triples(src)


# ---------------------------------------------------------------- pairs (question_pair: UTF-8 BOM CSV, inverted flag)

def test_pairs_read_a_bom_csv_with_the_labels_the_spec_gives(tmp_path):
    path = tmp_path / "kor_pair_train.csv"
    path.write_bytes("\ufeffid,qid1,qid2,question1,question2,is_duplicate\r\n"
                     "1,1,2,1000일 만난 여자친구와 이별,10년 연예의끝,1\r\n"
                     "2,3,4,2년동안 나 사랑해줘서 고맙다,2년여의 만남 사랑해 고마워,0\r\n"
                     "3,3,5,2년동안 나 사랑해줘서 고맙다,오늘 날씨 좋다,1\r\n"
                     "4,6,6,같은 질문,같은 질문,0\r\n".encode("utf-8"))
    fields = {"query": "question1", "document": "question2", "label": "is_duplicate", "id": "id"}
    notes: dict = {}
    got = read_triples(source(path, format="pairs", fields=fields, labels={"positive": ["0"], "negative": ["1"]}),
                       hard_negatives=1, notes=notes)
    assert rows(got) == [("2년동안 나 사랑해줘서 고맙다", ("2년여의 만남 사랑해 고마워",), ("오늘 날씨 좋다",), "2")]
    assert notes == {"queries without a positive": 2, "pairs of identical texts": 1}
    # Without negatives declared, the other rows are left out.
    got = read_triples(source(path, format="pairs", fields=fields, labels={"positive": [0]}), notes=notes)
    assert rows(got) == [("2년동안 나 사랑해줘서 고맙다", ("2년여의 만남 사랑해 고마워",), (), "2")]


# ---------------------------------------------------------------- triples without negatives (MS MARCO-ko)

def test_triples_with_a_list_of_positives_and_no_negatives_column(tmp_path):
    path = tmp_path / "msmarco_kor.json"
    path.write_text(json.dumps([{"id": 1, "query": "질문 하나", "positive": ["답 하나"]},
                                {"id": 2, "query": "질문 둘", "positive": ["답 둘", "답 셋"]}],
                               ensure_ascii=False, indent=4), encoding="utf-8")
    src = source(path, fields={"document": "positive", "hard_negative": None, "id": "id"})
    assert rows(read_triples(src, hard_negatives=3)) == [("질문 하나", ("답 하나",), (), "1"),
                                                         ("질문 둘", ("답 둘", "답 셋"), (), "2")]


def test_fewer_negatives_than_asked_are_fine_but_a_declared_column_missing_is_an_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"query": "a", "document": "b", "hard_negative": ["c"]}\n'
                    '{"query": "d", "document": "e", "hard_negative": []}\n{"query": "f", "document": "g"}\n',
                    encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: missing field 'hard_negative'"):
        read_triples(path, hard_negatives=4)
    got = read_triples(path, hard_negatives=4, skipped={})
    assert [t.hard_negatives for t in got] == [("c",), ()]


# ---------------------------------------------------------------- holdout

def test_holdout_sides_are_disjoint_cover_the_source_and_do_not_depend_on_position(tmp_path):
    articles = [(f"문서{i}", [(f"문서{i}의 문단 {p}", [f"문서{i}-{p} 질문 {q}" for q in range(2)]) for p in range(3)])
                for i in range(40)]
    path = write_squad(tmp_path / "a.json", articles)
    reordered = write_squad(tmp_path / "b.json", articles[::-1])

    def side(p, which, seed=0):
        return read_triples(source(p, format="squad", holdout={"fraction": 0.5, "side": which, "seed": seed}))

    whole = {t.query for t in read_triples(source(path, format="squad"))}
    train, bench = side(path, "train"), side(path, "bench")
    assert {t.unit for t in train}.isdisjoint({t.unit for t in bench})
    assert {t.query for t in train} | {t.query for t in bench} == whole and len(train) + len(bench) == len(whole)
    passages = lambda ts: {x for t in ts for x in (*t.positives, *t.hard_negatives)}  # noqa: E731
    assert passages(train).isdisjoint(passages(bench))
    assert 10 <= len({t.unit for t in bench}) <= 30  # about half of 40 articles
    assert {t.unit for t in side(reordered, "bench")} == {t.unit for t in bench}  # a hash of the unit, not its place
    assert {t.unit for t in side(path, "bench", seed=1)} != {t.unit for t in bench}


# ---------------------------------------------------------------- the spec

BASE = """
name: formats
model: {name_or_path: builtin:tiny-ko-bert}
train: {batch_size: 8, max_steps: 1, device: cpu}
cache: {chunk_size: 8}
data:
  sources:
"""


def expand_sources(tmp_path, sources_yaml: str):
    (tmp_path / "t.jsonl").write_text('{"query": "q", "document": "d", "hard_negative": "n"}\n', encoding="utf-8")
    (tmp_path / "p.txt").write_text("a\tb\n", encoding="utf-8")
    spec = tmp_path / "spec.yaml"
    spec.write_text(BASE + sources_yaml, encoding="utf-8")
    return expand(spec, check_devices=False)[0].spec


def test_the_spec_reads_format_keys_and_reports_each_misuse_with_its_key_path(tmp_path):
    spec = expand_sources(tmp_path, """
    - {path: p.txt, format: paraphrase, file_type: tsv, columns: [a, b], fields: {query: b}, group_size: 2}
    - {path: t.jsonl, format: pairs, labels: {positive: [0]}, encoding: cp949, holdout: {fraction: 0.3}}
""")
    s0, s1 = spec.data.sources
    assert (s0.format, s0.file_type, s0.columns, s0.group_size, s0.fields.query) == ("paraphrase", "tsv", ["a", "b"], 2, "b")
    assert (s1.labels, s1.encoding, s1.holdout.fraction, s1.holdout.side) == ({"positive": [0]}, "cp949", 0.3, "train")
    with pytest.raises(SpecError) as e:
        expand_sources(tmp_path, """
    - {path: t.jsonl, format: scored_pairs}
    - {path: t.jsonl, min_score: 3.0, labels: {positive: ["1"]}}
    - {path: t.jsonl, format: paraphrase}
    - {path: t.jsonl, format: pairs, labels: {same: ["1"]}}
    - {path: t.jsonl, encoding: klingon, columns: [a]}
    - {path: p.txt}
    - {path: t.jsonl, format: nli, labels: {entailment: [e], contradiction: [e]}, holdout: {fraction: 1.5}}
    - {path: t.jsonl, holdout: {side: bench}}
""")
    text = str(e.value)
    for expected in [
        "data.sources[0].min_score: ", "needed by format scored_pairs",
        "data.sources[1].min_score: ", "only used by format scored_pairs; this source's format is triples",
        "data.sources[1].labels: ", "only used by format nli and pairs",
        "data.sources[2].group_size: ", "format paraphrase needs exactly one of group_size",
        "data.sources[3].labels.same: ", "format pairs has no label class 'same'",
        "data.sources[3].labels.positive: ", "needed by format pairs",
        "data.sources[4].encoding: ", "unknown text encoding 'klingon'",
        "data.sources[4].columns: ", "only for CSV/TSV files without a header row",
        "data.sources[5].path: ", "unknown file type '.txt'", "set the source's file_type:",
        "data.sources[6].labels.contradiction: ", "label 'e' is also listed under entailment",
        "data.sources[6].holdout.fraction: ", "expected a fraction in [0, 1)",
        "data.sources[7].holdout.side: ", "side bench reads the held-out units, but holdout.fraction is 0",
    ]:
        assert expected in text, expected


def test_the_token_cache_key_covers_every_key_that_changes_the_triples(tmp_path):
    from koe5.data.tokens import TRIPLE_KEYS, cache_key

    # Every SourceSpec key but where the file is and how the mix draws/shows it must be in the key.
    assert set(TRIPLE_KEYS) == {f.name for f in dataclasses.fields(SourceSpec)} - {"path", "weight", "name"}
    spec = expand_sources(tmp_path, "    - {path: t.jsonl, format: scored_pairs, min_score: 4.0}\n")
    s = spec.data.sources[0]
    key = lambda src: cache_key(src, spec.data, spec.model, "tok", "fp")  # noqa: E731
    changed = [dataclasses.replace(s, min_score=3.0), dataclasses.replace(s, encoding="cp949"),
               dataclasses.replace(s, holdout=HoldoutSpec(fraction=0.5)),
               dataclasses.replace(s, holdout=HoldoutSpec(fraction=0.5, side="bench")),
               dataclasses.replace(s, fields=FieldsSpec(score="similarity")), dataclasses.replace(s, labels={"x": [1]})]
    assert len({key(s), *map(key, changed)}) == 1 + len(changed)
    assert key(dataclasses.replace(s, weight=3.0, name="other")) == key(s)


# ---------------------------------------------------------------- the real files, if this machine has them

REAL_SOURCES = """
    - {path: %(k)s/korquad_train_half/KorQuAD_v1.0_dev_even_articles.json, format: squad, name: korquad}
    - {path: %(k)s/msmarco_kor/msmarco_kor.json, name: msmarco-ko,
       fields: {query: query, document: positive, hard_negative: null, id: id}}
    - {path: %(k)s/klue_nli/benchmark_train_data.csv, format: nli, encoding: cp949, name: klue-nli,
       fields: {query: premise, document: hypothesis, label: label},
       labels: {entailment: [entailment], contradiction: [contradiction], neutral: [neutral]}}
    - {path: %(k)s/kornlu/xnli.dev.ko.tsv, format: nli, name: xnli-ko,
       fields: {query: sentence1, document: sentence2, label: gold_label},
       labels: {entailment: [entailment], contradiction: [contradiction], neutral: [neutral]}}
    - {path: %(k)s/kornlu/sts-train.tsv, format: scored_pairs, min_score: 4.0, name: korsts,
       fields: {query: sentence1, document: sentence2, score: score}}
    - {path: %(k)s/parakqc/paraKQC_v1.txt, format: paraphrase, file_type: tsv, columns: [intent, act, sentence],
       fields: {query: sentence}, group_size: 10, name: parakqc}
    - {path: %(k)s/question_pair/kor_pair_train.csv, format: pairs, name: question-pair,
       fields: {query: question1, document: question2, label: is_duplicate, id: id},
       labels: {positive: ["0"], negative: ["1"]}}
"""


@pytest.mark.skipif(not KO_PUBLIC.is_dir(), reason="the ko_public data is not on this machine")
def test_the_published_ko_public_files_read_as_their_formats(tmp_path):
    spec = expand_sources(tmp_path, REAL_SOURCES % {"k": KO_PUBLIC})
    counts = {s.name: len(read_triples(s, hard_negatives=1)) for s in spec.data.sources}
    assert counts == {"korquad": 3138, "msmarco-ko": 6980, "klue-nli": 9238, "xnli-ko": 829, "korsts": 1371,
                      "parakqc": 9995, "question-pair": 3799}
