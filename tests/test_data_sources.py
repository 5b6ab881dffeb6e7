"""Every source format reads to the same triples, with field mapping and list-valued fields, and every bad
record names its file:line (or row) and the field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from koe5.data.errors import DataError
from koe5.data.triples import read_triples

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"

ROWS = [
    {"question": "서울의 인구는?", "pos": ["서울 인구는 약 940만 명이다.", "서울특별시의 인구"], "neg": ["부산 인구", "대구 인구"]},
    {"question": "한강의 길이는?", "pos": ["한강은 약 494km이다."], "neg": ["낙동강의 길이", "금강의 길이"]},
    {"question": "김치의 재료는?", "pos": ["배추와 고춧가루"], "neg": ["된장의 재료", "간장의 재료"]},
]
FIELDS = {"query": "question", "document": "pos", "hard_negative": "neg"}
EXPECTED = [(r["question"], tuple(r["pos"]), tuple(r["neg"])) for r in ROWS]


def as_tuples(triples):
    return [(t.query, t.positives, t.hard_negatives) for t in triples]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_saved_dataset(path, rows, as_dict):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(rows)
    (DatasetDict({"train": ds, "dev": ds.select([0])}) if as_dict else ds).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json-array", "json-lines", "parquet", "saved", "saved-dict", "directory"])
def test_every_format_reads_the_same_triples_with_field_mapping_and_lists(tmp_path, fmt):
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    elif fmt == "json-array":
        path = tmp_path / "t.json"
        path.write_text(json.dumps(ROWS, ensure_ascii=False, indent=2), encoding="utf-8")
    elif fmt == "json-lines":  # JSON lines saved under a .json name
        path = write_jsonl(tmp_path / "t.json", ROWS)
    elif fmt == "parquet":
        path = write_parquet(tmp_path / "t.parquet", ROWS)
    elif fmt.startswith("saved"):
        path = write_saved_dataset(tmp_path / "saved", ROWS, as_dict=fmt == "saved-dict")
    else:
        path = tmp_path / "dir"
        (path / "b").mkdir(parents=True)
        write_jsonl(path / "a.jsonl", ROWS[:1])
        write_parquet(path / "b" / "c.parquet", ROWS[1:])
        (path / "notes.txt").write_text("not data")
    assert as_tuples(read_triples(path, hard_negatives=2, fields=FIELDS)) == EXPECTED


def test_csv_and_tsv_read_string_cells(tmp_path):
    import csv

    for name, delimiter in (("t.csv", ","), ("t.tsv", "\t")):
        path = tmp_path / name
        with open(path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter=delimiter)
            w.writerow(["question", "pos", "neg"])
            for r in ROWS:
                w.writerow([r["question"], r["pos"][0], r["neg"][0]])
        got = as_tuples(read_triples(path, hard_negatives=1, fields=FIELDS))
        assert got == [(q, p[:1], n[:1]) for q, p, n in EXPECTED]


@pytest.mark.parametrize("fmt", ["jsonl", "json-array", "csv", "parquet"])
def test_a_bad_record_names_its_line_and_field_in_every_format(tmp_path, fmt):
    rows = [{"query": "q1", "document": "d1", "hard_negative": "n1"},
            {"query": "q2", "document": "d2", "hard_negative": "n2"},
            {"query": "q3", "document": "", "hard_negative": "n3"}]  # the bad one: an empty document
    if fmt == "jsonl":
        path, where = write_jsonl(tmp_path / "t.jsonl", rows), ":3"
    elif fmt == "json-array":
        path = tmp_path / "t.json"
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        where = ":12"  # "[" then 5 lines per object: the third object opens on line 12
    elif fmt == "csv":
        path = tmp_path / "t.csv"
        path.write_text("query,document,hard_negative\nq1,d1,n1\nq2,d2,n2\nq3,,n3\n", encoding="utf-8")
        where = ":4"  # the header is line 1
    else:
        path, where = write_parquet(tmp_path / "t.parquet", rows), ": row 3"
    with pytest.raises(DataError) as e:
        read_triples(path)
    assert f"{path}{where}:" in str(e.value) and "'document'" in str(e.value) and "empty" in str(e.value)
    skipped: dict = {}
    assert len(read_triples(path, skipped=skipped)) == 2 and skipped == {str(path): 1}


def test_json_array_reports_the_line_each_object_starts_on(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[\n  {"query": "a", "document": "b", "hard_negative": "c"},\n\n  {"query": "a",\n'
                    '   "document": 3, "hard_negative": "c"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:4: field 'document' must be a string"):
        read_triples(path)


@pytest.mark.parametrize("record,message", [
    ({"question": "q", "pos": [], "neg": ["n"]}, "field 'pos' (document) is an empty list"),
    ({"question": "q", "pos": ["p", 7], "neg": ["n"]}, "field 'pos' (document) must be a string or a list of strings"),
    ({"question": "q", "pos": "p"}, "missing field 'neg' (hard_negative)"),
    ({"question": ["q"], "pos": "p", "neg": ["n", "m"]}, "field 'question' (query) must be a string, found list"),
    ({"question": None, "pos": "p", "neg": ["n", "m"]}, "missing field 'question' (query)"),
])
def test_mapped_fields_are_named_in_errors(tmp_path, record, message):
    path = write_jsonl(tmp_path / "t.jsonl", [ROWS[0], record])
    with pytest.raises(DataError) as e:
        read_triples(path, hard_negatives=2, fields=FIELDS)
    assert str(e.value).startswith(f"{path}:2: {message}")


def test_empty_sources_and_unknown_files_are_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no triples"):
        read_triples(tmp_path / "empty.jsonl")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no .jsonl"):
        read_triples(tmp_path / "d")
    with pytest.raises(DataError, match="no split 'test'"):
        read_triples(write_saved_dataset(tmp_path / "s", [{"query": "q", "document": "d", "hard_negative": "n"}],
                                         as_dict=True), split="test")


def test_spec_rejects_an_unknown_file_type_and_accepts_hub_ids_without_touching_the_network(tmp_path):
    from koe5.spec import SpecError, expand

    bad = tmp_path / "train.xlsx"
    bad.write_bytes(b"x")
    with pytest.raises(SpecError, match=r"data.sources\[0\].path: .*unknown file type '.xlsx'"):
        expand(QUICKSTART, [f"data.sources[0].path={bad}"])
    rs = expand(QUICKSTART, ["data.sources[0].path=hub:someone/ko-triples", "data.sources[0].split=train"])[0]
    assert rs.spec.data.sources[0].path == "hub:someone/ko-triples"
    assert rs.fingerprints["hub:someone/ko-triples"] == "hub:someone/ko-triples"


def test_an_unreachable_hub_dataset_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "koe5.cli", "data", "stats", str(QUICKSTART),
                           "data.sources[0].path=hub:koe5-test/does-not-exist"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                               "KOE5_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert "hub:koe5-test/does-not-exist: cannot load split 'train' from the dataset hub" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name,content", [
    ("t.csv", 'query,document,hard_negative\nq,d,n\n"caf\xe9",d,n\n'),
    ("t.json", '[\n  {"query": "q", "document": "d", "hard_negative": "n"},\n  {"query": "caf\xe9"}\n]\n'),
])
def test_bytes_that_are_not_utf8_name_their_line_in_whole_file_formats(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}:3: bytes that are not UTF-8"):
        read_triples(path)


def test_every_bad_line_is_named_in_one_error(tmp_path):
    """A file with several bad lines takes one run to find them all: each is named with its line, up to a
    limit, and the rest are counted."""
    from koe5.data.triples import MAX_REPORTED

    good = json.dumps({"query": "질문", "document": "문서", "hard_negative": "다른 문서"}, ensure_ascii=False)
    lines = [good, '{"query": "q" "document": "d"}', good, "not json", json.dumps({"query": "", "document": "d"})]
    path = tmp_path / "three.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_triples(path)
    message = str(info.value)
    assert "3 bad records" in message
    for line in (2, 4, 5):
        assert f"{path}:{line}:" in message
    assert "character 1 of the line" in message  # not a bare "column 1"
    many = tmp_path / "many.jsonl"
    many.write_text("\n".join([good] + ["not json"] * (MAX_REPORTED + 5)) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_triples(many)
    message = str(info.value)
    assert f"{MAX_REPORTED + 5} bad records" in message and "... and 5 more" in message
    assert message.count("not valid JSON") == MAX_REPORTED
