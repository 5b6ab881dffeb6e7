"""`koe5 mine`: mined negatives are never positives, respect the margin and the rank range (checked against
an independent brute-force ranking), the output is training data, and bad input exits 2 with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from koe5 import cli
from koe5.data.mine import mine
from koe5.data.triples import Triple, read_triples, text_key
from koe5.demo_model import SAMPLE_TRAIN

MODEL = "builtin:tiny-ko-bert"
RANKS = (1, 100)
NEGATIVES = 4
# The untrained demo model scores nearly everything 0.88-0.94, so the margins that bind for it are tight.
MARGINS = {"relative": ("--margin", 0.998), "absolute": ("--margin-abs", 0.002)}
FULL_WIDTH = str.maketrans("0123456789.", "０１２３４５６７８９．")


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def limit_of(best: float, kind: str) -> float:
    flag, value = MARGINS[kind]
    return best - value if flag == "--margin-abs" else value * best


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """200 sample rows, their hard negatives as an extra JSONL corpus, normalized-text copies of their
    positives as a .txt corpus, and one more row repeating a query with a second positive: a passage that
    would be mined for that query if it were not a positive."""
    from koe5.encoder import load_encoder

    tmp = tmp_path_factory.mktemp("mine")
    base = [json.loads(line) for line in SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines()[:200]]
    extra_jsonl = [r["hard_negative"] for r in base]
    # Same text_key as the positive (NFKC, whitespace), different tokens: must be excluded as a positive.
    extra_txt = [" " + r["document"].translate(FULL_WIDTH).replace(" ", "  ") for r in base[:50]]
    encoder = load_encoder(MODEL)

    def build(rows):
        corpus = list(dict.fromkeys([p for r in rows for p in ([r["document"]] if isinstance(r["document"], str)
                                                                else r["document"])] + extra_jsonl + extra_txt))
        queries = list(dict.fromkeys(r["query"].strip() for r in rows))
        scores = encoder.encode(queries, "query: ", 256) @ encoder.encode(corpus, "passage: ", 256).T
        return corpus, queries, scores

    # The duplicated query: the first row whose hard negative would be mined under both margins.
    corpus, queries, scores = build(base)
    at = {p: i for i, p in enumerate(corpus)}
    dup = None
    for qi, r in enumerate(base):
        s = scores[qi]
        rank = 1 + int((s > s[at[r["hard_negative"]]]).sum())
        best = s[at[r["document"]]]
        if RANKS[0] <= rank <= RANKS[1] and all(s[at[r["hard_negative"]]] < limit_of(best, k) for k in MARGINS):
            dup = r
            break
    assert dup is not None, "no sample row has a hard negative inside the rank range and margin"
    rows = base + [{"query": f"  {dup['query']} ", "document": [dup["hard_negative"]]}]

    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (tmp / "extra.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                             for t in extra_jsonl), encoding="utf-8")
    (tmp / "extra.txt").write_text("".join(t + "\n" for t in extra_txt), encoding="utf-8")
    corpus, queries, scores = build(rows)
    return {"tmp": tmp, "data": data, "rows": rows, "dup": dup, "corpus": corpus, "queries": queries,
            "scores": scores}


@pytest.fixture(scope="module", params=sorted(MARGINS))
def mined(request, sample):
    flag, value = MARGINS[request.param]
    out = sample["tmp"] / f"mined-{request.param}.jsonl"
    code = cli.main(["mine", "--model", MODEL, "--data", str(sample["data"]),
                     "--corpus", str(sample["tmp"] / "extra.jsonl"), "--corpus", str(sample["tmp"] / "extra.txt"),
                     "--out", str(out), "--ranks", f"{RANKS[0]}-{RANKS[1]}", flag, str(value),
                     "--negatives", str(NEGATIVES), "--no-progress"])
    assert code == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    meta = json.loads((sample["tmp"] / f"mined-{request.param}.jsonl.meta.json").read_text())
    return {"kind": request.param, "out": out, "rows": [json.loads(x) for x in lines], "meta": meta}


def positives_by_query(rows) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(r["query"].strip(), []).extend([r["document"]] if isinstance(r["document"], str)
                                                       else r["document"])
    return out


def test_mined_negatives_are_ranked_in_range_below_the_margin_and_never_positives(sample, mined):
    corpus, scores = sample["corpus"], sample["scores"]
    at = {p: i for i, p in enumerate(corpus)}
    positives = positives_by_query(sample["rows"])
    # Eligible by a clear margin (1e-6) from the score limit: faiss and numpy round the last bit differently,
    # so a passage within a rounding error of the limit may fall on either side of it.
    clearly_eligible = {}
    for qi, q in enumerate(sample["queries"]):
        s = scores[qi]
        best = max(s[at[p]] for p in positives[q])
        excluded = {text_key(p) for p in positives[q]}
        rank = 1 + (s[None, :] > s[:, None] + 1e-6).sum(axis=1)  # the best rank each passage can have
        worst = (s[None, :] >= s[:, None] - 1e-6).sum(axis=1)    # and the worst
        clearly_eligible[q] = [j for j in range(len(corpus)) if rank[j] >= RANKS[0] and worst[j] <= RANKS[1]
                               and s[j] < limit_of(best, mined["kind"]) - 1e-6 and text_key(corpus[j]) not in excluded]

    assert mined["rows"], "nothing was mined"
    for row in mined["rows"]:
        q = row["query"].strip()
        qi = sample["queries"].index(q)
        s = scores[qi]
        best = max(s[at[p]] for p in positives[q])
        assert 1 <= len(row["hard_negative"]) <= NEGATIVES
        for neg in row["hard_negative"]:
            assert text_key(neg) not in {text_key(p) for p in positives[q]}
            assert s[at[neg]] < limit_of(best, mined["kind"]) + 1e-6
            rank = 1 + int((s > s[at[neg]] + 1e-6).sum())
            assert RANKS[0] <= rank <= RANKS[1]
        # The first survivors in rank order, not just any: nothing clearly eligible and clearly better than the
        # last one taken (or, for a short row, nothing clearly eligible at all) was left out.
        got = row["hard_negative"]
        floor = min(s[at[n]] for n in got) if len(got) == NEGATIVES else -np.inf
        left_out = [corpus[j] for j in clearly_eligible[q] if corpus[j] not in got and s[j] > floor + 1e-6]
        assert not left_out, (q, left_out)

    # Every row is either written or counted as having none; the margin left some rows short.
    meta = mined["meta"]
    assert meta["rows_read"] == len(sample["rows"])
    assert meta["rows_written"] == len(mined["rows"])
    assert meta["rows_written"] + meta["rows_without_negatives"] == meta["rows_read"]
    written = {r["query"].strip() for r in mined["rows"]}
    assert all(q in written for q, eligible in clearly_eligible.items() if eligible)
    negatives_of = {r["query"]: len(r["hard_negative"]) for r in mined["rows"]}
    assert meta["rows_short"] == sum(1 for r in sample["rows"] if negatives_of.get(r["query"], 0) < NEGATIVES)
    assert meta["corpus"] == len(corpus)
    assert meta["args"]["ranks"] == f"{RANKS[0]}-{RANKS[1]}"


def test_a_query_repeated_with_another_positive_excludes_both(sample, mined):
    dup = sample["dup"]
    for_dup = [r for r in mined["rows"] if r["query"].strip() == dup["query"]]
    assert len(for_dup) == 2  # both rows of the query are written, each with its own document
    assert {r["document"] for r in for_dup} == {dup["document"], dup["hard_negative"]}
    for r in for_dup:
        mined_keys = {text_key(n) for n in r["hard_negative"]}
        assert text_key(dup["document"]) not in mined_keys
        assert text_key(dup["hard_negative"]) not in mined_keys


def test_output_is_training_data(mined):
    for row in mined["rows"]:
        assert set(row) == {"query", "document", "hard_negative"}
        assert isinstance(row["query"], str) and row["query"].strip()
        docs = [row["document"]] if isinstance(row["document"], str) else row["document"]
        assert docs and all(isinstance(d, str) and d.strip() for d in docs)
        assert row["hard_negative"] and all(isinstance(n, str) and n.strip() for n in row["hard_negative"])
    triples = read_triples(mined["out"], hard_negatives=1)
    assert len(triples) == len(mined["rows"])


def test_mine_excludes_positives_by_normalized_text_and_applies_the_margin():
    # Hand-made scores make every rule decisive: "B" and " a " would be taken if they were not positives
    # of "q" (through its second row, and as a normalized copy of "A"), "D" is within the margin.
    rows = [Triple("q", ("A",), ()), Triple(" q", ("B",), ())]
    passages = ["A", "B", " a ", "D", "C", "E", "F"]
    q_scores = np.array([1.0, 0.9, 0.85, 0.96, 0.8, 0.7, 0.6])
    passage_emb = np.zeros((len(passages), len(passages)), dtype=np.float32)
    np.fill_diagonal(passage_emb, 1.0)
    query_emb = q_scores[None].astype(np.float32)
    out, stats = mine(rows, passages, query_emb, passage_emb, ranks=(1, 6), negatives=2, margin=0.95)
    assert [r["hard_negative"] for r in out] == [["C", "E"], ["C", "E"]]
    assert [r["document"] for r in out] == ["A", "B"]
    out, stats = mine(rows, passages, query_emb, passage_emb, ranks=(1, 5), negatives=2, margin_abs=0.01)
    assert [r["hard_negative"] for r in out] == [["D", "C"], ["D", "C"]]
    out, stats = mine(rows, passages, query_emb, passage_emb, ranks=(6, 7), negatives=3, margin=0.5)
    assert out == [] and stats.rows_without_negatives == 2 and stats.rows_short == 2


@pytest.mark.parametrize("content, line, field", [
    ('{"query": "a", "document": "b"}\n\n{"query": "a", "document": ', 3, "JSON"),
    ('{"query": "a", "document": "b"}\n{"document": "b"}\n', 2, "'query'"),
    ('{"query": "a", "document": [1]}\n', 1, "'document'"),
])
def test_a_bad_line_exits_2_naming_file_line_and_field(tmp_path, capsys, content, line, field):
    data = tmp_path / "bad.jsonl"
    data.write_text(content, encoding="utf-8")
    code, out, err = run_cli(capsys, "mine", "--model", MODEL, "--data", str(data), "--out", str(tmp_path / "o.jsonl"))
    assert code == 2
    assert f"{data}:{line}:" in err and field in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("option", [["--ranks", "100-10"], ["--ranks", "0-5"], ["--ranks", "x"],
                                    ["--margin", "1.5"], ["--margin-abs", "-1"], ["--negatives", "0"]])
def test_a_bad_option_exits_2_naming_it(tmp_path, capsys, option):
    code, out, err = run_cli(capsys, "mine", "--model", MODEL, "--data", str(SAMPLE_TRAIN),
                             "--out", str(tmp_path / "o.jsonl"), *option)
    assert code == 2 and option[0] in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_missing_file_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    code, out, err = run_cli(capsys, "mine", "--model", MODEL, "--data", str(missing), "--out", str(tmp_path / "o"))
    assert code == 2 and str(missing) in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "mine", "--model", MODEL, "--data", str(SAMPLE_TRAIN),
                             "--corpus", str(missing), "--out", str(tmp_path / "o"))
    assert code == 2 and str(missing) in err
